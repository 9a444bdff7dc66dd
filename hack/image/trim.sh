#!/bin/sh
# Removes from the image's root filesystem ($1, `/` in the Dockerfile) what Pequod never reads,
# after the packages are installed (dpkg's path-exclude cannot be used: maintainer scripts run
# perl modules while the base is set up). Both image builders run this one script: the Dockerfile
# and hack/image.sh. Pequod runs git (clone and fetch over https, ssh and git://), ssh and cue;
# none of them reads documentation, translations, perl modules (git depends on perl for
# commands Pequod does not run) or iconv modules, and git's servers and extra tools never start.
set -eu
root="${1:?usage: trim.sh ROOT}"
for path in \
  usr/share/doc usr/share/man usr/share/info usr/share/locale usr/share/lintian \
  usr/share/perl usr/lib/*-linux-gnu/perl usr/lib/*-linux-gnu/gconv \
  usr/share/gitweb usr/share/git-core/templates \
  usr/lib/git-core/git-daemon usr/lib/git-core/git-http-backend usr/lib/git-core/git-http-push \
  usr/lib/git-core/git-imap-send usr/lib/git-core/git-shell usr/lib/git-core/scalar \
  usr/bin/git-shell usr/bin/scalar \
  var/cache/apt var/cache/debconf/templates.dat-old var/lib/apt/lists var/log/apt var/log/dpkg.log
do
  # The unquoted expansion is the point: the architecture's folder is a glob.
  rm -rf "${root%/}/"${path}
done
