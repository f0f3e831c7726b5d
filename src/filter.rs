//! The CEL filter `exporter.filter.expression`, with upstream's semantics (`commons/pkg/celevent`):
//! one variable, `event`, a map of the health event's fields; an event is exported when the
//! expression evaluates to `true`, dropped when `false`, and exported anyway (fail open) when
//! the evaluation fails.
//!
//! cel-go type-checks the expression when it is compiled and rejects one whose result is not
//! `bool`. The `cel` crate only parses, so the check is done here on the parsed tree: the root
//! must be a comparison, a logical operator, `in`, a boolean literal, `has()`, an
//! `all`/`exists`/`exists_one` macro, a boolean member function, or a conditional whose
//! branches are all of those. A bare field read (`event.isFatal`) is rejected, as upstream does.
//! The program is then evaluated once against a sample event; a result that is not a boolean is
//! rejected too (an evaluation error is not: real events may have what the sample lacks).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use cel::common::ast::{operators, Expr, IdedExpr, LiteralValue};
use cel::{Context, Env, Program, Value};

use crate::model::HealthEvent;

/// The one variable an expression can read.
pub const VARIABLE: &str = "event";

/// Why an expression cannot be used; upstream's wording where it has one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error("CEL compilation failed: {0}")]
    Syntax(String),
    #[error(
        "CEL compilation failed: undeclared reference to '{0}' (the only variable is `event`)"
    )]
    Undeclared(String),
    #[error(
        "expression must return boolean, got {0} (a bare field read is untyped; compare it, \
         for example `event.isFatal == true`)"
    )]
    NotBoolean(String),
}

/// Why one event could not be evaluated; the event is exported anyway.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EvalError(String);

/// A compiled filter expression. Compile once; evaluate per event.
pub struct Filter {
    expression: String,
    program: Program,
    env: Arc<Env>,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Filter")
            .field("expression", &self.expression)
            .finish_non_exhaustive()
    }
}

impl Filter {
    /// Compiles `expression`. A blank expression is no filter (`Ok(None)`): export everything.
    pub fn compile(expression: &str) -> Result<Option<Filter>, CompileError> {
        if expression.trim().is_empty() {
            return Ok(None);
        }
        let env = Arc::new(Env::stdlib());
        let program = env
            .compile(expression)
            .map_err(|e| CompileError::Syntax(e.to_string()))?;
        let root = program.expression();
        if let Some(name) = undeclared(root) {
            return Err(CompileError::Undeclared(name));
        }
        let result = static_type(root);
        if result != "bool" {
            return Err(CompileError::NotBoolean(result));
        }
        let filter = Filter {
            expression: expression.to_string(),
            program,
            env,
        };
        // The tree says boolean; make sure the interpreter agrees on a typical event.
        if let Ok(value) = filter.execute(&sample_event()) {
            if !matches!(value, Value::Bool(_)) {
                return Err(CompileError::NotBoolean(value.type_of().to_string()));
            }
        }
        Ok(Some(filter))
    }

    /// The expression as configured.
    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// Whether `event` is to be exported. An error means the expression could not be evaluated
    /// for this event (for example a key it reads is absent).
    pub fn matches(&self, event: &HealthEvent<'_>) -> Result<bool, EvalError> {
        match self.execute(event) {
            Ok(Value::Bool(keep)) => Ok(keep),
            Ok(other) => Err(EvalError(format!(
                "expression returned {}, not a boolean",
                other.type_of()
            ))),
            Err(error) => Err(EvalError(error.to_string())),
        }
    }

    fn execute(&self, event: &HealthEvent<'_>) -> Result<Value, cel::ExecutionError> {
        let mut context = Context::with_env(self.env.clone());
        context.add_variable_from_value(VARIABLE, activation(event));
        self.program.execute(&context)
    }
}

/// The `event` map: upstream's bound fields, `recommendedAction` as its enum name. Absent
/// fields are their zero values, as in Go.
fn activation(event: &HealthEvent<'_>) -> Value {
    let text = |s: &str| Value::from(s);
    let error_code: Vec<Value> = event.error_code.iter().map(|c| text(c)).collect();
    let metadata: HashMap<&str, Value> = event
        .metadata
        .iter()
        .map(|(k, v)| (&**k, text(v)))
        .collect();
    let fields: HashMap<&str, Value> = HashMap::from([
        ("agent", text(&event.agent)),
        ("checkName", text(&event.check_name)),
        ("componentClass", text(&event.component_class)),
        ("errorCode", Value::List(Arc::new(error_code))),
        ("isFatal", Value::Bool(event.is_fatal)),
        ("isHealthy", Value::Bool(event.is_healthy)),
        ("recommendedAction", text(&event.recommended_action)),
        ("nodeName", text(&event.node_name)),
        ("metadata", Value::from(metadata)),
        ("message", text(&event.message)),
    ]);
    Value::from(fields)
}

/// An event with every bound field set, for the start-up evaluation.
fn sample_event() -> HealthEvent<'static> {
    HealthEvent {
        agent: "gpu-health-monitor".into(),
        component_class: "GPU".into(),
        check_name: "GpuXidError".into(),
        is_fatal: true,
        message: "sample".into(),
        recommended_action: "RESTART_VM".into(),
        error_code: vec!["79".into()],
        metadata: [("node.kubernetes.io/instance-type".into(), "sample".into())].into(),
        node_name: "node-1".into(),
        ..HealthEvent::default()
    }
}

/// Identifiers that name types (`type(x) == string`), valid without a declaration.
const TYPE_NAMES: &[&str] = &[
    "bool",
    "bytes",
    "double",
    "duration",
    "int",
    "list",
    "map",
    "null_type",
    "string",
    "timestamp",
    "type",
    "uint",
];

/// The first identifier that is neither `event`, a type name, nor bound by a macro.
fn undeclared(root: &IdedExpr) -> Option<String> {
    fn walk(expr: &IdedExpr, bound: &mut Vec<String>) -> Option<String> {
        match &expr.expr {
            Expr::Ident(name) => {
                (name != VARIABLE && !TYPE_NAMES.contains(&name.as_str()) && !bound.contains(name))
                    .then(|| name.clone())
            }
            Expr::Select(select) => walk(&select.operand, bound),
            Expr::Call(call) => call
                .target
                .iter()
                .map(|t| &**t)
                .chain(&call.args)
                .find_map(|e| walk(e, bound)),
            Expr::List(list) => list.elements.iter().find_map(|e| walk(e, bound)),
            Expr::Map(map) => map.entries.iter().find_map(|entry| match &entry.expr {
                cel::common::ast::EntryExpr::MapEntry(e) => {
                    walk(&e.key, bound).or_else(|| walk(&e.value, bound))
                }
                cel::common::ast::EntryExpr::StructField(f) => walk(&f.value, bound),
            }),
            Expr::Struct(s) => s.entries.iter().find_map(|entry| match &entry.expr {
                cel::common::ast::EntryExpr::MapEntry(e) => {
                    walk(&e.key, bound).or_else(|| walk(&e.value, bound))
                }
                cel::common::ast::EntryExpr::StructField(f) => walk(&f.value, bound),
            }),
            Expr::Comprehension(c) => {
                if let Some(name) = walk(&c.iter_range, bound).or_else(|| walk(&c.accu_init, bound))
                {
                    return Some(name);
                }
                let depth = bound.len();
                bound.push(c.iter_var.clone());
                bound.extend(c.iter_var2.clone());
                bound.push(c.accu_var.clone());
                let found = [&c.loop_cond, &c.loop_step, &c.result]
                    .into_iter()
                    .find_map(|e| walk(e, bound));
                bound.truncate(depth);
                found
            }
            Expr::Literal(_) | Expr::Unspecified => None,
        }
    }
    walk(root, &mut Vec::new())
}

/// The type of `expr` as far as its syntax tells, in cel-go's spelling; `dyn` when only the
/// event could tell (a field read, an index).
fn static_type(expr: &IdedExpr) -> String {
    match &expr.expr {
        Expr::Literal(literal) => literal_type(literal).to_string(),
        Expr::Ident(name) if name == VARIABLE => "map(string, dyn)".to_string(),
        Expr::Ident(name) if TYPE_NAMES.contains(&name.as_str()) => "type".to_string(),
        Expr::Ident(_) | Expr::Unspecified => "dyn".to_string(),
        // `has(event.x)` is a presence test; `event.x` is a field read.
        Expr::Select(select) if select.test => "bool".to_string(),
        Expr::Select(_) => "dyn".to_string(),
        Expr::List(list) => format!("list({})", common_type(&list.elements)),
        Expr::Map(map) => map_type(map),
        Expr::Struct(s) => s.type_name.clone(),
        // The macros: `all` and `exists` accumulate a boolean from a boolean literal;
        // `exists_one` compares its count; `map` and `filter` build a list.
        Expr::Comprehension(c) => match &c.result.expr {
            Expr::Ident(name) if *name == c.accu_var => match &c.accu_init.expr {
                Expr::List(_) => "list(dyn)".to_string(),
                _ => static_type(&c.accu_init),
            },
            _ => static_type(&c.result),
        },
        Expr::Call(call) => call_type(call),
    }
}

fn literal_type(literal: &LiteralValue) -> &'static str {
    match literal {
        LiteralValue::Boolean(_) => "bool",
        LiteralValue::Bytes(_) => "bytes",
        LiteralValue::Double(_) => "double",
        LiteralValue::Int(_) => "int",
        LiteralValue::Null => "null_type",
        LiteralValue::String(_) => "string",
        LiteralValue::UInt(_) => "uint",
    }
}

/// `map(K, V)` with the common types of the keys and of the values.
fn map_type(map: &cel::common::ast::MapExpr) -> String {
    let (keys, values): (Vec<_>, Vec<_>) = map
        .entries
        .iter()
        .filter_map(|entry| match &entry.expr {
            cel::common::ast::EntryExpr::MapEntry(e) => Some((e.key.clone(), e.value.clone())),
            cel::common::ast::EntryExpr::StructField(_) => None,
        })
        .unzip();
    format!("map({}, {})", common_type(&keys), common_type(&values))
}

/// The result type of an operator or a function call (`dyn` when it depends on the data).
fn call_type(call: &cel::common::ast::CallExpr) -> String {
    let args = &call.args;
    let bool_ = || "bool".to_string();
    match call.func_name.as_str() {
        operators::EQUALS
        | operators::NOT_EQUALS
        | operators::LESS
        | operators::LESS_EQUALS
        | operators::GREATER
        | operators::GREATER_EQUALS
        | operators::IN
        | operators::LOGICAL_AND
        | operators::LOGICAL_OR
        | operators::LOGICAL_NOT
        | operators::NOT_STRICTLY_FALSE => bool_(),
        operators::CONDITIONAL if args.len() == 3 => common_type(args.get(1..).unwrap_or_default()),
        operators::ADD
        | operators::SUBSTRACT
        | operators::MULTIPLY
        | operators::DIVIDE
        | operators::MODULO
        | operators::NEGATE => common_type(args),
        // String tests, as member functions; `matches` also as a global one.
        "contains" | "startsWith" | "endsWith" | "matches" | "hasValue"
            if call.target.is_some() =>
        {
            bool_()
        }
        "matches" if args.len() == 2 => bool_(),
        "bool" | "int" | "uint" | "double" | "string" | "bytes" | "timestamp" | "duration"
            if call.target.is_none() =>
        {
            call.func_name.clone()
        }
        "size" => "int".to_string(),
        "type" if call.target.is_none() => "type".to_string(),
        name if name.starts_with("get") && call.target.is_some() => "int".to_string(),
        _ => "dyn".to_string(),
    }
}

/// The type all of `exprs` share, else `dyn`.
fn common_type(exprs: &[IdedExpr]) -> String {
    let types: BTreeSet<String> = exprs.iter().map(static_type).collect();
    match types.len() {
        1 => types.into_iter().next().unwrap_or_default(),
        _ => "dyn".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event<'a>(action: &'a str, codes: &[&'a str]) -> HealthEvent<'a> {
        HealthEvent {
            agent: "gpu-health-monitor".into(),
            check_name: "GpuXidError".into(),
            component_class: "GPU".into(),
            recommended_action: action.into(),
            error_code: codes.iter().map(|c| (*c).into()).collect(),
            node_name: "node-1".into(),
            ..HealthEvent::default()
        }
    }

    fn compile(expression: &str) -> Filter {
        Filter::compile(expression)
            .unwrap_or_else(|e| panic!("{expression}: {e}"))
            .unwrap_or_else(|| panic!("{expression}: no program"))
    }

    fn rejected(expression: &str) -> CompileError {
        match Filter::compile(expression) {
            Err(error) => error,
            Ok(_) => panic!("{expression:?} compiled"),
        }
    }

    #[test]
    fn blank_expressions_are_no_filter() {
        for blank in ["", "   ", "\t\n"] {
            assert!(Filter::compile(blank).expect(blank).is_none(), "{blank:?}");
        }
    }

    #[test]
    fn not_none_drops_none_and_keeps_the_rest() {
        let filter = compile("event.recommendedAction != 'NONE'");
        assert_eq!(filter.matches(&event("NONE", &[])), Ok(false));
        assert_eq!(filter.matches(&event("CONTACT_SUPPORT", &[])), Ok(true));
        assert_eq!(filter.matches(&event("RESTART_VM", &["79"])), Ok(true));
    }

    #[test]
    fn error_code_membership_drops_any_event_with_code_45() {
        let filter = compile("event.recommendedAction != 'NONE' && !('45' in event.errorCode)");
        assert_eq!(filter.matches(&event("RESTART_VM", &["45"])), Ok(false));
        assert_eq!(
            filter.matches(&event("RESTART_VM", &["13", "45"])),
            Ok(false)
        );
        assert_eq!(filter.matches(&event("RESTART_VM", &["13"])), Ok(true));
        assert_eq!(filter.matches(&event("RESTART_VM", &[])), Ok(true));
        assert_eq!(filter.matches(&event("NONE", &["13"])), Ok(false));
    }

    #[test]
    fn bare_field_reads_are_rejected() {
        for expression in ["event.agent", "event.isFatal", "event['isFatal']", "event"] {
            let error = rejected(expression);
            assert!(
                error.to_string().contains("must return boolean"),
                "{expression}: {error}"
            );
        }
        assert_eq!(
            rejected("event.agent").to_string(),
            "expression must return boolean, got dyn (a bare field read is untyped; compare \
             it, for example `event.isFatal == true`)"
        );
    }

    #[test]
    fn non_boolean_expressions_are_rejected_with_their_type() {
        for (expression, got) in [
            ("1 + 1", "int"),
            ("'a'", "string"),
            ("['45']", "list(string)"),
            ("size(event.errorCode)", "int"),
            ("event.isFatal ? 'a' : 'b'", "string"),
            ("event.isFatal ? true : event.isHealthy", "dyn"),
            ("event.errorCode.map(c, c == '45')", "list(dyn)"),
            ("event.errorCode.filter(c, c == '45')", "list(dyn)"),
        ] {
            assert_eq!(
                rejected(expression),
                CompileError::NotBoolean(got.into()),
                "{expression}"
            );
        }
    }

    #[test]
    fn syntax_errors_are_rejected() {
        for expression in ["event.recommendedAction !=", "event.agent == 'x' &&", "(("] {
            let error = rejected(expression);
            assert!(
                matches!(error, CompileError::Syntax(_)),
                "{expression}: {error}"
            );
            assert!(error.to_string().starts_with("CEL compilation failed: "));
        }
    }

    #[test]
    fn undeclared_variables_are_rejected() {
        assert_eq!(
            rejected("evnt.isFatal == true"),
            CompileError::Undeclared("evnt".into())
        );
        // Macro variables and type names are declared.
        compile("event.errorCode.exists(c, c == '45')");
        compile("type(event.agent) == string");
    }

    #[test]
    fn boolean_expressions_compile() {
        for expression in [
            "!('45' in event.errorCode)",
            "event.recommendedAction != 'NONE'",
            "event.isFatal == true",
            "event.isFatal && event.recommendedAction != 'NONE' && '79' in event.errorCode",
            "true",
            "has(event.metadata.zone)",
            "event.errorCode.all(c, c != '45')",
            "event.errorCode.exists(c, c == '45')",
            "event.errorCode.exists_one(c, c == '45')",
            "event.isFatal ? event.agent == 'a' : !event.isHealthy",
            "event.agent.startsWith('gpu')",
            "event.agent.endsWith('monitor')",
            "event.message.contains('Xid')",
            "event.nodeName.matches('^node-[0-9]+$')",
            "matches(event.nodeName, '^node-')",
            "size(event.errorCode) > 0 || event.isHealthy",
        ] {
            compile(expression);
        }
    }

    #[test]
    fn evaluation_errors_fail_open() {
        let filter = compile("event.notAField == 'x'");
        let error = filter
            .matches(&event("NONE", &[]))
            .expect_err("no such key");
        assert!(error.to_string().contains("notAField"), "{error}");
    }

    #[test]
    fn metadata_is_a_map_of_strings() {
        let filter = compile("event.metadata['zone'] == 'a'");
        let mut in_a = event("NONE", &[]);
        in_a.metadata.insert("zone".into(), "a".into());
        let mut in_b = in_a.clone();
        in_b.metadata.insert("zone".into(), "b".into());
        assert_eq!(filter.matches(&in_a), Ok(true));
        assert_eq!(filter.matches(&in_b), Ok(false));
        // A missing key is an evaluation error (fail open), as in cel-go.
        assert!(filter.matches(&event("NONE", &[])).is_err());
        assert_eq!(
            compile("'zone' in event.metadata").matches(&event("NONE", &[])),
            Ok(false)
        );
    }

    #[test]
    fn every_bound_field_is_readable_and_unbound_ones_are_not() {
        let mut e = event("RESTART_VM", &["79"]);
        e.is_fatal = true;
        e.message = "Xid 79".into();
        e.processing_strategy = "STORE_ONLY".into();
        let filter = compile(
            "event.agent == 'gpu-health-monitor' && event.checkName == 'GpuXidError' \
             && event.componentClass == 'GPU' && event.errorCode == ['79'] && event.isFatal \
             && !event.isHealthy && event.recommendedAction == 'RESTART_VM' \
             && event.nodeName == 'node-1' && event.metadata == {} && event.message == 'Xid 79'",
        );
        assert_eq!(filter.matches(&e), Ok(true));
        assert!(compile("event.processingStrategy == 'STORE_ONLY'")
            .matches(&e)
            .is_err());
    }

    #[test]
    fn filter_is_shareable_between_workers() {
        fn shareable<T: Send + Sync>() {}
        shareable::<Filter>();
    }
}
