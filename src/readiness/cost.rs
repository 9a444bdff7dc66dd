//! The worst-case cost of a readiness expression, estimated from its syntax tree before it is
//! ever evaluated, the way the apiserver estimates CRD validation rules. CEL has no loops
//! other than its comprehensions (`all`, `exists`, `exists_one`, `map`, `filter`), so the cost
//! is the size of the tree with every comprehension's body multiplied by the most items its
//! range can have, and every string or list function charged by the length it goes over.
//!
//! There is no schema to bound the live object, so each of its lists and maps is assumed to
//! hold [`ASSUMED_ITEMS`] items and each of its strings [`ASSUMED_CHARS`] characters; literals
//! count as written. An object larger than that is not refused here: its evaluation is bounded
//! by the evaluation pool's deadline instead (see `super::pool`).
//!
//! One unit of cost is about one step of the interpreter: an operator or function call, a
//! variable or field read, one list item copied, or ten characters gone over.

use cel::common::ast::{ComprehensionExpr, EntryExpr, Expr, IdedExpr, operators};
use cel::common::value::CelVal;

/// Most estimated cost a readiness expression may have. A unit took 1 to 60 ns in the
/// interpreter (unoptimised test build; the dearest units are steps over literal lists), so an
/// expression at the limit evaluates in about 0.1 s at most: well within the evaluation deadline.
pub const MAX_COST: u64 = 2_000_000;
/// Items assumed for each list or map of the live object.
pub const ASSUMED_ITEMS: u64 = 100;
/// Characters assumed for each string of the live object.
pub const ASSUMED_CHARS: u64 = 256;
/// Characters gone over per unit of cost (the apiserver's traversal factor, 0.1).
const CHARS_PER_UNIT: u64 = 10;
/// Units a regular expression costs per character of its pattern: it is compiled at every call
/// (about 25 µs for the shortest pattern).
const REGEX_UNITS_PER_PATTERN_CHAR: u64 = 1000;
/// Characters of the longest number, boolean or timestamp turned into a string.
const SCALAR_CHARS: u64 = 32;

/// The estimated worst-case cost of evaluating `expression` once.
pub fn estimate(expression: &IdedExpr) -> u64 {
    walk(expression, &mut Vec::new()).cost
}

/// The estimated cost of evaluating `expression` over `object`, whose lists, maps and strings
/// are as large as they really are: the assumptions of [`estimate`] scaled by how far the
/// object's largest collection and string exceed them. Checked before an evaluation is
/// started, so that an expression cheap on small objects never takes an evaluation slot on a
/// huge one.
pub fn estimate_over(expression: &IdedExpr, object: &serde_json::Value) -> u64 {
    let (items, chars) = largest(object);
    let base = estimate(expression);
    let scale = |actual: u64, assumed: u64| actual.div_ceil(assumed).max(1);
    // Nesting multiplies: an expression may go over the largest collection once per level of
    // comprehension, so the factor is applied as often as it nests.
    let depth = comprehension_depth(expression).max(1);
    let factor = scale(items, ASSUMED_ITEMS)
        .saturating_pow(depth)
        .max(scale(chars, ASSUMED_CHARS));
    base.saturating_mul(factor)
}

/// Items of the largest list or map, and characters of the longest string, in `value`.
fn largest(value: &serde_json::Value) -> (u64, u64) {
    use serde_json::Value;
    match value {
        Value::Array(items) => items
            .iter()
            .map(largest)
            .fold((items.len() as u64, 0), |(i, c), (ni, nc)| (i.max(ni), c.max(nc))),
        Value::Object(fields) => fields.iter().fold((fields.len() as u64, 0), |(i, c), (k, v)| {
            let (ni, nc) = largest(v);
            (i.max(ni), c.max(nc).max(k.len() as u64))
        }),
        Value::String(text) => (0, text.len() as u64),
        _ => (0, 0),
    }
}

/// How deeply comprehensions nest in `expression`.
fn comprehension_depth(expression: &IdedExpr) -> u32 {
    fn depth(expr: &IdedExpr) -> u32 {
        match &expr.expr {
            Expr::Comprehension(c) => {
                1 + [&c.iter_range, &c.accu_init, &c.loop_cond, &c.loop_step, &c.result]
                    .into_iter()
                    .map(depth)
                    .max()
                    .unwrap_or(0)
            }
            Expr::Call(call) => call
                .target
                .iter()
                .map(|t| depth(t))
                .chain(call.args.iter().map(depth))
                .max()
                .unwrap_or(0),
            Expr::List(list) => list.elements.iter().map(depth).max().unwrap_or(0),
            Expr::Select(select) => depth(&select.operand),
            _ => 0,
        }
    }
    depth(expression)
}

/// How large a value may be: items of a list or map, characters of a string or bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Size {
    items: u64,
    chars: u64,
}

impl Size {
    /// Any value read from the live object.
    const OBJECT: Size = Size {
        items: ASSUMED_ITEMS,
        chars: ASSUMED_CHARS,
    };
    /// A number, boolean or null.
    const SCALAR: Size = Size { items: 0, chars: 0 };

    fn join(self, other: Size) -> Size {
        Size {
            items: self.items.max(other.items),
            chars: self.chars.max(other.chars),
        }
    }

    fn plus(self, other: Size) -> Size {
        Size {
            items: self.items.saturating_add(other.items),
            chars: self.chars.saturating_add(other.chars),
        }
    }

    /// What a step adds to an accumulator of this size.
    fn growth_from(self, before: Size) -> Size {
        Size {
            items: self.items.saturating_sub(before.items),
            chars: self.chars.saturating_sub(before.chars),
        }
    }

    fn times(self, n: u64) -> Size {
        Size {
            items: self.items.saturating_mul(n),
            chars: self.chars.saturating_mul(n),
        }
    }

    /// The cost of going over every item or character once (a value is a list, a map or a
    /// string, not several at once).
    fn traversal(self) -> u64 {
        self.items.max(self.chars.div_ceil(CHARS_PER_UNIT))
    }
}

/// What is known of a value: its size, and the size of each of its items (the values a
/// comprehension over it binds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    size: Size,
    item: Size,
}

impl Shape {
    const OBJECT: Shape = Shape {
        size: Size::OBJECT,
        item: Size::OBJECT,
    };
    const SCALAR: Shape = Shape {
        size: Size::SCALAR,
        item: Size::SCALAR,
    };
}

#[derive(Debug, Clone, Copy)]
struct Estimate {
    cost: u64,
    shape: Shape,
}

impl Estimate {
    fn new(cost: u64, shape: Shape) -> Self {
        Self { cost, shape }
    }

    fn size(&self) -> Size {
        self.shape.size
    }
}

/// Variables bound by the comprehensions around an expression, innermost last. Any other name
/// (`self`) is the live object.
type Scope = Vec<(String, Shape)>;

fn lookup(scope: &Scope, name: &str) -> Shape {
    scope
        .iter()
        .rev()
        .find(|(bound, _)| bound == name)
        .map_or(Shape::OBJECT, |(_, shape)| *shape)
}

fn total(estimates: &[Estimate]) -> u64 {
    estimates.iter().fold(0, |sum, e| sum.saturating_add(e.cost))
}

fn walk(expr: &IdedExpr, scope: &mut Scope) -> Estimate {
    match &expr.expr {
        Expr::Unspecified => Estimate::new(1, Shape::SCALAR),
        Expr::Literal(value) => Estimate::new(1, literal(value)),
        Expr::Ident(name) => Estimate::new(1, lookup(scope, name)),
        Expr::Select(select) => {
            let operand = walk(&select.operand, scope);
            let shape = if select.test {
                Shape::SCALAR
            } else {
                field_of(operand.shape)
            };
            Estimate::new(operand.cost.saturating_add(1), shape)
        }
        Expr::List(list) => {
            let items: Vec<Estimate> = list.elements.iter().map(|e| walk(e, scope)).collect();
            collection(&items)
        }
        Expr::Map(map) => entries(map.entries.iter().map(|e| &e.expr), scope),
        Expr::Struct(structure) => entries(structure.entries.iter().map(|e| &e.expr), scope),
        Expr::Call(call) => {
            let args: Vec<Estimate> = call
                .target
                .iter()
                .map(|t| t.as_ref())
                .chain(call.args.iter())
                .map(|a| walk(a, scope))
                .collect();
            self::call(&call.func_name, &args)
        }
        Expr::Comprehension(comprehension) => self::comprehension(comprehension, scope),
    }
}

fn literal(value: &CelVal) -> Shape {
    let chars = match value {
        CelVal::String(s) => s.chars().count() as u64,
        CelVal::Bytes(b) => b.len() as u64,
        _ => 0,
    };
    Shape {
        size: Size { items: 0, chars },
        item: Size::SCALAR,
    }
}

/// A field or item of a value: anything the live object may hold, or a literal's item.
fn field_of(shape: Shape) -> Shape {
    Shape {
        size: Size::OBJECT.join(shape.item),
        item: Size::OBJECT,
    }
}

/// A list literal: building it copies each item.
fn collection(items: &[Estimate]) -> Estimate {
    let count = items.len() as u64;
    let item = items.iter().fold(Size::SCALAR, |size, e| size.join(e.size()));
    Estimate::new(
        total(items).saturating_add(count).saturating_add(1),
        Shape {
            size: Size { items: count, chars: 0 },
            item,
        },
    )
}

/// A map or message literal: its keys and values are its items.
fn entries<'e>(entries: impl Iterator<Item = &'e EntryExpr>, scope: &mut Scope) -> Estimate {
    let mut parts = Vec::new();
    let mut count = 0;
    for entry in entries {
        count += 1;
        match entry {
            EntryExpr::MapEntry(e) => {
                parts.push(walk(&e.key, scope));
                parts.push(walk(&e.value, scope));
            }
            EntryExpr::StructField(f) => parts.push(walk(&f.value, scope)),
        }
    }
    let mut estimate = collection(&parts);
    estimate.shape.size.items = count;
    estimate
}

/// An operator or function: its arguments (target first), then its own work.
// Long, but one flat table with a row per operator or function: clearer whole.
fn call(name: &str, args: &[Estimate]) -> Estimate {
    let arguments = total(args);
    let size = |i: usize| args.get(i).map_or(Size::SCALAR, Estimate::size);
    let traversed: u64 = args.iter().fold(0, |sum, a| sum.saturating_add(a.size().traversal()));
    let (work, shape) = match name {
        // Only one branch runs, the dearer in the worst case.
        operators::CONDITIONAL => {
            let (then, otherwise) = (args.get(1), args.get(2));
            let branches = then.map_or(0, |e| e.cost).max(otherwise.map_or(0, |e| e.cost));
            let shape = Shape {
                size: size(1).join(size(2)),
                item: then
                    .map_or(Size::SCALAR, |e| e.shape.item)
                    .join(otherwise.map_or(Size::SCALAR, |e| e.shape.item)),
            };
            let condition = args.first().map_or(0, |e| e.cost);
            return Estimate::new(condition.saturating_add(branches).saturating_add(1), shape);
        }
        // Concatenation copies both sides.
        operators::ADD => (
            traversed,
            Shape {
                size: size(0).plus(size(1)),
                item: args.iter().fold(Size::SCALAR, |item, a| item.join(a.shape.item)),
            },
        ),
        // Comparison stops at the shorter side.
        operators::EQUALS
        | operators::NOT_EQUALS
        | operators::LESS
        | operators::LESS_EQUALS
        | operators::GREATER
        | operators::GREATER_EQUALS => (size(0).traversal().min(size(1).traversal()), Shape::SCALAR),
        // Membership compares the value with every item.
        operators::IN => (
            size(1)
                .items
                .saturating_mul(size(0).traversal().saturating_add(1))
                .saturating_add(size(1).chars.div_ceil(CHARS_PER_UNIT)),
            Shape::SCALAR,
        ),
        operators::INDEX | operators::OPT_INDEX | operators::OPT_SELECT => {
            (0, field_of(args.first().map_or(Shape::OBJECT, |a| a.shape)))
        }
        operators::LOGICAL_AND
        | operators::LOGICAL_OR
        | operators::LOGICAL_NOT
        | operators::NOT_STRICTLY_FALSE
        | operators::NEGATE
        | operators::SUBSTRACT
        | operators::MULTIPLY
        | operators::DIVIDE
        | operators::MODULO
        | "size" => (0, Shape::SCALAR),
        "contains" | "startsWith" | "endsWith" => (traversed, Shape::SCALAR),
        // A regular expression is compiled at every call, then runs over the whole string.
        "matches" => (
            size(1)
                .chars
                .max(1)
                .saturating_mul(REGEX_UNITS_PER_PATTERN_CHAR)
                .saturating_add(size(0).traversal()),
            Shape::SCALAR,
        ),
        "string" | "bytes" => (
            traversed,
            Shape {
                size: Size {
                    items: 0,
                    chars: size(0).chars.max(SCALAR_CHARS),
                },
                item: Size::SCALAR,
            },
        ),
        "max" | "min" => (
            traversed,
            Shape {
                size: args.iter().fold(Size::SCALAR, |s, a| s.join(a.shape.item)),
                item: Size::SCALAR,
            },
        ),
        // Conversions, time functions and anything unknown: charged for reading all of their
        // arguments, and the result may be as large as anything.
        _ => (traversed, Shape::OBJECT),
    };
    Estimate::new(arguments.saturating_add(work).saturating_add(1), shape)
}

/// A comprehension runs its condition and step once per item of its range. The step may grow
/// the accumulator (`map` and `filter` append to a list), so the step is costed with the
/// accumulator as large as it can end up.
fn comprehension(c: &ComprehensionExpr, scope: &mut Scope) -> Estimate {
    let range = walk(&c.iter_range, scope);
    let init = walk(&c.accu_init, scope);
    let iterations = range.size().items;
    let item = Shape {
        size: range.shape.item,
        item: Size::OBJECT,
    };
    let outer = scope.len();
    scope.push((c.iter_var.clone(), item));
    if let Some(second) = &c.iter_var2 {
        scope.push((second.clone(), item));
    }

    scope.push((c.accu_var.clone(), init.shape));
    let first_step = walk(&c.loop_step, scope);
    scope.pop();
    let growth = first_step.size().growth_from(init.size());
    let accumulator = Shape {
        size: init.size().plus(growth.times(iterations)),
        item: init.shape.item.join(first_step.shape.item),
    };
    scope.push((c.accu_var.clone(), accumulator));
    let step = walk(&c.loop_step, scope);
    let condition = walk(&c.loop_cond, scope);
    let per_item = step.cost.saturating_add(condition.cost).saturating_add(1);
    scope.truncate(outer + 1 + usize::from(c.iter_var2.is_some()));
    let result = walk(&c.result, scope);
    scope.truncate(outer);

    let cost = range
        .cost
        .saturating_add(init.cost)
        .saturating_add(iterations.saturating_mul(per_item))
        .saturating_add(result.cost);
    Estimate::new(cost, result.shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cost(expression: &str) -> u64 {
        let program = cel::Program::compile(expression).unwrap();
        estimate(program.expression())
    }

    fn numbers(n: u64) -> String {
        let items: Vec<String> = (1..=n).map(|i| i.to_string()).collect();
        format!("[{}]", items.join(","))
    }

    #[test]
    fn expressions_cost_what_they_may_do_in_the_worst_case() {
        let hundred = numbers(100);
        let thirty = numbers(30);
        #[rustfmt::skip]
        let cases: Vec<(&str, String, bool)> = vec![
            ("a field comparison", "self.status.readyReplicas >= self.spec.replicas".into(), true),
            ("the documented Deployment gate", "self.status.readyReplicas >= self.spec.replicas && self.status.conditions.exists(c, c.type == 'Available' && c.status == 'True')".into(), true),
            ("has and a string", "has(self.spec.clusterIP) && self.spec.clusterIP != ''".into(), true),
            ("one list matched against another", "self.spec.containers.all(c, self.status.containerStatuses.exists(s, s.name == c.name && s.ready))".into(), true),
            ("small literal lists nested", format!("{thirty}.all(x, {thirty}.exists(y, x + y == 7))"), true),
            ("a filter and its size", "self.status.conditions.filter(c, c.status == 'True').size() >= 2".into(), true),
            ("every key against every other (the e2e test's)", "self.data.all(k, !self.data.exists(j, size(j) > 99))".into(), true),
            ("a regular expression", "self.metadata.name.matches('^web-[a-z]+$')".into(), true),
            ("three object lists nested", "self.a.all(x, self.b.all(y, self.c.exists(z, x == y && y == z)))".into(), false),
            ("the reviewer's literal lists", format!("{hundred}.all(x, {hundred}.all(y, {hundred}.exists(z, x + y == z)))"), false),
            ("four small literal lists", format!("{thirty}.all(a, {thirty}.all(b, {thirty}.all(c, {thirty}.exists(d, a + b + c == d))))"), false),
            ("strings repeated in a map", format!("{hundred}.map(x, {hundred}.map(y, self.metadata.name + self.metadata.name + self.metadata.name)).size() > 0"), false),
            ("a string grown in nested maps", "self.a.map(x, self.b.map(y, x + y + x + y)).exists(l, l.exists(s, s.contains('needle')))".into(), false),
            ("regular expressions in nested loops", "self.a.all(x, self.b.all(y, x.matches(y)))".into(), false),
        ];
        for (case, expression, accepted) in cases {
            let cost = cost(&expression);
            assert_eq!(cost <= MAX_COST, accepted, "{case}: cost {cost}");
        }
    }

    #[test]
    fn an_expression_cheap_on_small_objects_is_dear_on_a_huge_one() {
        let expression = "self.data.all(k, !self.data.exists(j, size(j) > 99))";
        let program = cel::Program::compile(expression).unwrap();
        assert!(estimate(program.expression()) <= MAX_COST, "accepted when compiled");
        let object = |keys: usize| {
            let data: serde_json::Map<String, serde_json::Value> =
                (0..keys).map(|i| (format!("k{i}"), serde_json::json!("v"))).collect();
            serde_json::json!({"data": data})
        };
        assert!(estimate_over(program.expression(), &object(10)) <= MAX_COST);
        let huge = estimate_over(program.expression(), &object(4000));
        assert!(huge > MAX_COST, "{huge}");
        let long_string = serde_json::json!({"data": {"a": "x".repeat(100_000)}});
        assert!(
            estimate_over(program.expression(), &long_string) > estimate(program.expression()),
            "long strings scale too"
        );
    }

    #[test]
    fn nesting_multiplies_and_accumulating_lists_costs_their_copies() {
        let single = cost("self.a.all(x, x == 1)");
        let nested = cost("self.a.all(x, self.b.all(y, y == 1))");
        assert!(nested > single * (ASSUMED_ITEMS - 1), "{single} then {nested}");
        // `map` appends to its result at every step: quadratic in the range.
        let mapped = cost("self.a.map(x, x).size() > 0");
        assert!(mapped >= ASSUMED_ITEMS * ASSUMED_ITEMS, "{mapped}");
        // Literal lists count as written.
        assert!(cost(&format!("{}.all(x, x > 0)", numbers(300))) > cost(&format!("{}.all(x, x > 0)", numbers(3))) * 50);
    }

    #[test]
    fn strings_cost_by_their_length() {
        let short = cost("'abc'.contains('b')");
        let long = cost(&format!("'{}'.contains('b')", "a".repeat(900)));
        assert!(long >= short + 80, "{short} then {long}");
        assert!(cost("self.a + self.a + self.a + self.a") > cost("self.a + self.a"));
    }

    #[test]
    fn only_one_branch_of_a_conditional_is_charged() {
        let both = cost("self.a.all(x, x == 1) || self.a.all(x, x == 2)");
        let either = cost("self.ok ? self.a.all(x, x == 1) : self.a.all(x, x == 2)");
        assert!(either < both, "{either} vs {both}");
    }
}
