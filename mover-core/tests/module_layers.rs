//! One direction of dependency between the modules of mover-core.
//!
//! Every source file under `src/` is lexed (proc-macro2: comments are gone, strings are
//! literals) and each path that names a module of the crate is collected: `use` trees,
//! `crate::…`, `super::…` and `self::…` paths, and paths starting with the name of a child
//! module, inside macro calls too. Visibilities (`pub(super)`) are not uses. A path makes the
//! module it appears in depend on the module it names; names the crate root re-exports
//! (`crate::Result`) count as the module they come from.
//!
//! The nodes of the graph are the top-level modules and the submodules of [`SPLIT`]; deeper
//! modules and inline `mod tests` blocks belong to the node they are in. The graph must have no
//! cycle, and the hand-listed rules of `docs/architecture.md` must hold. The checker itself is
//! tested on small crates with known cycles, so a checker that finds nothing fails too.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;

use proc_macro2::{Delimiter, Spacing, TokenStream, TokenTree};

/// Modules whose submodules are nodes of their own.
const SPLIT: [&str; 3] = ["endpoint", "nbd", "qcow2"];

/// A module path inside the crate; `[]` is the crate root.
type ModPath = Vec<String>;

/// Node → the nodes it depends on.
type Graph = BTreeMap<String, BTreeSet<String>>;

// ---------------------------------------------------------------------------------------------
// Lexing
// ---------------------------------------------------------------------------------------------

/// A token, with `::` as one token and groups kept as trees.
enum Tok {
    Ident(String),
    Colon2,
    Punct(char),
    Group(Delimiter, Vec<Tok>),
    Literal,
}

fn toks(stream: TokenStream) -> Vec<Tok> {
    let mut out = Vec::new();
    let mut iter = stream.into_iter().peekable();
    while let Some(tt) = iter.next() {
        out.push(match tt {
            TokenTree::Ident(i) => Tok::Ident(i.to_string()),
            TokenTree::Punct(p)
                if p.as_char() == ':'
                    && p.spacing() == Spacing::Joint
                    && matches!(iter.peek(), Some(TokenTree::Punct(q)) if q.as_char() == ':') =>
            {
                iter.next();
                Tok::Colon2
            }
            TokenTree::Punct(p) => Tok::Punct(p.as_char()),
            TokenTree::Group(g) => Tok::Group(g.delimiter(), toks(g.stream())),
            TokenTree::Literal(_) => Tok::Literal,
        });
    }
    out
}

/// The module a file under `src/` defines: `nbd/mod.rs` → `nbd`, `nbd/client.rs` →
/// `nbd::client`, `lib.rs` → the root.
fn file_module(relative: &str) -> ModPath {
    let mut parts: ModPath = relative
        .trim_end_matches(".rs")
        .split('/')
        .map(str::to_owned)
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod")) || relative == "lib.rs" {
        parts.pop();
    }
    parts
}

// ---------------------------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------------------------

/// A path found in a source file, as written.
struct Found {
    file: String,
    /// The module it appears in (an inline `mod tests` included).
    module: ModPath,
    path: Vec<String>,
    /// What a `use` makes the path's last part known as (its name, or its `as` name).
    imported_as: Option<String>,
}

/// The paths a `use` tree imports, with the names they are imported as:
/// `a::{b, c::{self, d as e}}` → `a::b` as `b`, `a::c` as `c`, `a::c::d` as `e`. A glob
/// (`a::*`) names the module `a`.
fn use_paths(toks: &[Tok], prefix: &[String], out: &mut Vec<(Vec<String>, Option<String>)>) {
    let mut path = prefix.to_vec();
    let mut rename = None;
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Ident(s) if s == "as" => {
                if let Some(Tok::Ident(name)) = toks.get(i + 1) {
                    rename = Some(name.clone());
                }
                break;
            }
            // `{self, …}` names the prefix itself; a leading `self::` is the current module.
            Tok::Ident(s) if s == "self" && !path.is_empty() => {}
            Tok::Ident(s) => path.push(s.clone()),
            Tok::Punct('*') => {
                out.push((path, None));
                return;
            }
            Tok::Group(Delimiter::Brace, inner) => {
                for part in inner.split(|t| matches!(t, Tok::Punct(','))) {
                    if !part.is_empty() {
                        use_paths(part, &path, out);
                    }
                }
                return;
            }
            _ => {}
        }
        i += 1;
    }
    let name = rename.or_else(|| path.last().cloned());
    out.push((path, name));
}

/// Collect the paths of `toks`, which lie in `module`; note every inline module in `modules`.
fn scan(
    toks: &[Tok],
    file: &str,
    module: &ModPath,
    modules: &mut BTreeSet<ModPath>,
    out: &mut Vec<Found>,
) {
    let found = |path: Vec<String>, imported_as: Option<String>| Found {
        file: file.to_owned(),
        module: module.clone(),
        path,
        imported_as,
    };
    let mut after_colon2 = false;
    let mut i = 0;
    while i < toks.len() {
        let next = toks.get(i + 1);
        match &toks[i] {
            Tok::Ident(kw) if kw == "mod" => {
                if let (Some(Tok::Ident(name)), Some(Tok::Group(Delimiter::Brace, body))) =
                    (next, toks.get(i + 2))
                {
                    let mut inner = module.clone();
                    inner.push(name.clone());
                    modules.insert(inner.clone());
                    scan(body, file, &inner, modules, out);
                    i += 3;
                    continue;
                }
            }
            // A visibility: `pub(crate)`, `pub(super)`, `pub(in crate::x)` use no module.
            Tok::Ident(kw)
                if kw == "pub" && matches!(next, Some(Tok::Group(Delimiter::Parenthesis, _))) =>
            {
                i += 2;
                continue;
            }
            Tok::Ident(kw) if kw == "use" && !after_colon2 => {
                let end = toks[i..]
                    .iter()
                    .position(|t| matches!(t, Tok::Punct(';')))
                    .map_or(toks.len(), |n| i + n);
                let mut paths = Vec::new();
                use_paths(&toks[i + 1..end], &[], &mut paths);
                out.extend(paths.into_iter().map(|(p, name)| found(p, name)));
                i = end + 1;
                after_colon2 = false;
                continue;
            }
            Tok::Ident(first) if !after_colon2 && matches!(next, Some(Tok::Colon2)) => {
                let mut path = vec![first.clone()];
                let mut j = i + 1;
                while let (Some(Tok::Colon2), Some(Tok::Ident(part))) =
                    (toks.get(j), toks.get(j + 1))
                {
                    path.push(part.clone());
                    j += 2;
                }
                out.push(found(path, None));
                i = j;
                after_colon2 = false;
                continue;
            }
            Tok::Group(_, inner) => scan(inner, file, module, modules, out),
            _ => {}
        }
        after_colon2 = matches!(toks[i], Tok::Colon2);
        i += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// The graph
// ---------------------------------------------------------------------------------------------

/// What the sources say about the crate's modules.
struct Crate {
    /// Node → node it depends on → the first place that says so.
    edges: BTreeMap<String, BTreeMap<String, String>>,
    /// Every node, also those that depend on nothing.
    nodes: BTreeSet<String>,
    /// Paths under `crate::`, `super::` or `self::` that name no module or re-export.
    unresolved: Vec<String>,
    /// Files outside `py/` that name `pyo3` in code.
    pyo3_outside_py: Vec<String>,
}

impl Crate {
    fn graph(&self) -> Graph {
        let mut g: Graph = self
            .nodes
            .iter()
            .map(|n| (n.clone(), BTreeSet::new()))
            .collect();
        for (from, tos) in &self.edges {
            g.entry(from.clone())
                .or_default()
                .extend(tos.keys().cloned());
        }
        g
    }

    fn deps(&self, node: &str) -> BTreeSet<String> {
        self.edges
            .get(node)
            .map(|tos| tos.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// The dependencies on `node` or a submodule of it from outside it, each with where it
    /// comes from: `(from, "from -> to  (file: path)")`.
    fn edges_into(&self, node: &str) -> Vec<(String, String)> {
        let inside = |n: &str| n == node || n.starts_with(&format!("{node}::"));
        let mut out = Vec::new();
        for (from, tos) in self.edges.iter().filter(|(from, _)| !inside(from)) {
            for (to, why) in tos.iter().filter(|(to, _)| inside(to)) {
                out.push((from.clone(), format!("{from} -> {to}  ({why})")));
            }
        }
        out
    }

    fn why(&self, from: &str, to: &str) -> &str {
        &self.edges[from][to]
    }
}

/// The node a module belongs to (`None` for the crate root).
fn node(module: &[String]) -> Option<String> {
    let top = module.first()?;
    Some(match module.get(1) {
        Some(sub) if SPLIT.contains(&top.as_str()) => format!("{top}::{sub}"),
        _ => top.clone(),
    })
}

/// Read a crate from `(path under src/, text)` pairs.
fn read_crate(files: &[(String, String)]) -> Crate {
    let mut modules = BTreeSet::new();
    let mut found = Vec::new();
    let mut pyo3_outside_py = Vec::new();
    for (file, text) in files {
        let stream: TokenStream = text
            .parse()
            .unwrap_or_else(|e| panic!("{file} does not lex: {e:?}"));
        let toks = toks(stream);
        if !file.starts_with("py/") && mentions(&toks, "pyo3") {
            pyo3_outside_py.push(file.clone());
        }
        let module = file_module(file);
        modules.insert(module.clone());
        scan(&toks, file, &module, &mut modules, &mut found);
    }

    // Names the crate root imports (`pub use error::{MoverError, Result}`), and what they are.
    let root_aliases: BTreeMap<String, Vec<String>> = found
        .iter()
        .filter(|f| f.module.is_empty())
        .filter_map(|f| {
            let name = f.imported_as.clone()?;
            let path = absolute(&modules, &[], &f.path)?;
            Some((name, path))
        })
        .collect();

    let mut krate = Crate {
        edges: BTreeMap::new(),
        nodes: modules.iter().filter_map(|m| node(m)).collect(),
        unresolved: Vec::new(),
        pyo3_outside_py,
    };
    for f in &found {
        let Some(from) = node(&f.module) else {
            continue; // the root only declares modules and re-exports
        };
        let Some(path) = absolute(&modules, &f.module, &f.path) else {
            continue; // another crate, or a local name
        };
        let Some(target) = module_of(&modules, &root_aliases, &path) else {
            krate
                .unresolved
                .push(format!("{}: {}", f.file, f.path.join("::")));
            continue;
        };
        let Some(to) = node(&target) else {
            krate.unresolved.push(format!(
                "{}: {} names the crate root",
                f.file,
                f.path.join("::")
            ));
            continue;
        };
        if to != from {
            krate
                .edges
                .entry(from)
                .or_default()
                .entry(to)
                .or_insert_with(|| format!("{}: {}", f.file, f.path.join("::")));
        }
    }
    krate
}

/// `path`, written in `module`, from the crate root; `None` when it does not start in this
/// crate (another crate, `Self`, a local item or an imported name).
fn absolute(
    modules: &BTreeSet<ModPath>,
    module: &[String],
    path: &[String],
) -> Option<Vec<String>> {
    let (first, rest) = path.split_first()?;
    match first.as_str() {
        "crate" => Some(rest.to_vec()),
        "self" => Some([module, rest].concat()),
        "super" => {
            let mut base = module.to_vec();
            let mut rest = path;
            while rest.first().is_some_and(|s| s == "super") {
                base.pop()?;
                rest = &rest[1..];
            }
            Some([&base[..], rest].concat())
        }
        _ => {
            let child = [module, &path[..1]].concat();
            modules.contains(&child).then(|| [module, path].concat())
        }
    }
}

/// The module an absolute path names or lies in; names the root re-exports are followed.
fn module_of(
    modules: &BTreeSet<ModPath>,
    root_aliases: &BTreeMap<String, Vec<String>>,
    path: &[String],
) -> Option<ModPath> {
    let longest = (0..=path.len())
        .rev()
        .find(|&n| modules.contains(&path[..n]))?;
    if longest > 0 || path.is_empty() {
        return Some(path[..longest].to_vec());
    }
    let alias = root_aliases.get(&path[0])?;
    module_of(
        modules,
        &BTreeMap::new(),
        &[&alias[..], &path[1..]].concat(),
    )
}

fn mentions(toks: &[Tok], name: &str) -> bool {
    toks.iter().any(|t| match t {
        Tok::Ident(s) => s == name,
        Tok::Group(_, inner) => mentions(inner, name),
        _ => false,
    })
}

/// One cycle of each tangle of `g`, as the nodes along it, the first repeated at the end.
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    tangles(g).iter().map(|t| cycle_through(g, t)).collect()
}

/// The tangles of `g`: its strongly connected components of more than one node, in order.
fn tangles(g: &Graph) -> Vec<BTreeSet<String>> {
    // Tarjan's strongly connected components (petgraph has them, but is not a dependency
    // worth taking for fifty lines).
    struct State<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        components: Vec<BTreeSet<&'a str>>,
    }
    fn visit<'a>(state: &mut State<'a>, node: &'a str) {
        let index = state.index.len();
        state.index.insert(node, index);
        state.low.insert(node, index);
        state.stack.push(node);
        state.on_stack.insert(node);
        let graph = state.graph;
        for next in graph.get(node).into_iter().flatten() {
            let next = next.as_str();
            if !state.index.contains_key(next) {
                visit(state, next);
                let low = state.low[node].min(state.low[next]);
                state.low.insert(node, low);
            } else if state.on_stack.contains(next) {
                let low = state.low[node].min(state.index[next]);
                state.low.insert(node, low);
            }
        }
        if state.low[node] == state.index[node] {
            let mut component = BTreeSet::new();
            loop {
                let member = state.stack.pop().expect("node is on the stack");
                state.on_stack.remove(member);
                component.insert(member);
                if member == node {
                    break;
                }
            }
            state.components.push(component);
        }
    }
    let mut state = State {
        graph: g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        components: Vec::new(),
    };
    for node in g.keys() {
        if !state.index.contains_key(node.as_str()) {
            visit(&mut state, node);
        }
    }
    let mut out: Vec<BTreeSet<String>> = state
        .components
        .iter()
        .filter(|c| c.len() > 1)
        .map(|c| c.iter().map(|&n| n.to_owned()).collect())
        .collect();
    out.sort();
    out
}

/// A shortest cycle through the first node of a strongly connected component, within it.
fn cycle_through(g: &Graph, component: &BTreeSet<String>) -> Vec<String> {
    let start = component.first().expect("not empty").as_str();
    let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(v) = queue.pop_front() {
        for w in g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if w == start {
                let mut path = vec![start.to_owned(), v.to_owned()];
                let mut at = v;
                while at != start {
                    at = came_from[at];
                    path.push(at.to_owned());
                }
                path.reverse();
                return path;
            }
            if component.contains(w) && !came_from.contains_key(w) {
                came_from.insert(w, v);
                queue.push_back(w);
            }
        }
    }
    unreachable!("a strongly connected component has a cycle through each node")
}

// ---------------------------------------------------------------------------------------------
// The crate's own rules
// ---------------------------------------------------------------------------------------------

fn source_files(dir: &Path, under: &str, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if path.is_dir() {
            source_files(&path, &format!("{under}{name}/"), out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push((
                format!("{under}{name}"),
                std::fs::read_to_string(&path).unwrap(),
            ));
        }
    }
}

fn mover_core() -> Crate {
    let mut files = Vec::new();
    source_files(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        "",
        &mut files,
    );
    for needed in ["lib.rs", "endpoint/mod.rs", "nbd/mod.rs", "py/mod.rs"] {
        assert!(files.iter().any(|(f, _)| f == needed), "{needed} not found");
    }
    read_crate(&files)
}

#[test]
fn every_path_into_the_crate_names_a_module() {
    let krate = mover_core();
    assert!(
        krate.unresolved.is_empty(),
        "unresolved: {:#?}",
        krate.unresolved
    );
}

#[test]
fn modules_depend_in_one_direction() {
    let krate = mover_core();
    // The checker sees the crate: a few dependencies that must be there.
    for (from, to) in [
        ("copy", "endpoint"),
        ("nbd", "nbd::client"),
        ("qcow2::writer", "qcow2::format"),
    ] {
        assert!(krate.deps(from).contains(to), "{from} -> {to} not seen");
    }
    let g = krate.graph();
    let found = tangles(&g);
    let report: Vec<String> = found
        .iter()
        .map(|tangle| {
            let edges: Vec<String> = tangle
                .iter()
                .flat_map(|from| g[from].intersection(tangle).map(move |to| (from, to)))
                .map(|(from, to)| format!("  {from} -> {to}  ({})", krate.why(from, to)))
                .collect();
            let cycle = cycle_through(&g, tangle).join(" -> ");
            format!("{cycle}, among:\n{}", edges.join("\n"))
        })
        .collect();
    assert!(found.is_empty(), "module cycles:\n{}", report.join("\n"));
}

/// The interface knows no implementation: the copy engine sees only `Endpoint`, and opening a
/// specification is the one place that knows every kind.
#[test]
fn the_endpoint_interface_imports_only_errors_and_progress() {
    let krate = mover_core();
    let allowed: BTreeSet<String> = ["error", "progress"].map(str::to_owned).into();
    let deps = krate.deps("endpoint");
    let extra: Vec<_> = deps
        .difference(&allowed)
        .map(|to| format!("endpoint -> {to}  ({})", krate.why("endpoint", to)))
        .collect();
    assert!(extra.is_empty(), "{extra:#?}");
}

/// The copy engine and the chains see an NBD export only as an `Endpoint`.
#[test]
fn only_open_names_the_nbd_endpoint() {
    let krate = mover_core();
    let into = krate.edges_into("nbd");
    assert!(into.iter().any(|(from, _)| from == "open"), "{into:#?}");
    let others: Vec<_> = into.iter().filter(|(from, _)| from != "open").collect();
    assert!(others.is_empty(), "{others:#?}");
}

/// The binding is the top layer: the rest of the crate builds without it.
#[test]
fn nothing_depends_on_the_binding() {
    let krate = mover_core();
    let into = krate.edges_into("py");
    assert!(into.is_empty(), "{into:#?}");
}

#[test]
fn nothing_outside_the_binding_mentions_pyo3() {
    let krate = mover_core();
    assert!(
        krate.pyo3_outside_py.is_empty(),
        "{:?}",
        krate.pyo3_outside_py
    );
}

// ---------------------------------------------------------------------------------------------
// The checker on crates with known answers
// ---------------------------------------------------------------------------------------------

fn graph(edges: &[(&str, &str)]) -> Graph {
    let mut g = Graph::new();
    for (from, to) in edges {
        g.entry((*from).to_owned())
            .or_default()
            .insert((*to).to_owned());
        g.entry((*to).to_owned()).or_default();
    }
    g
}

#[test]
fn the_cycle_finder_finds_every_cycle_and_only_cycles() {
    let g = graph(&[
        ("a", "b"),
        ("b", "c"),
        ("c", "a"),
        ("c", "d"),
        ("d", "e"),
        ("e", "d"),
        ("e", "f"),
    ]);
    assert_eq!(
        cycles(&g),
        vec![vec!["a", "b", "c", "a"], vec!["d", "e", "d"]]
    );
    let acyclic = graph(&[("a", "b"), ("a", "c"), ("b", "d"), ("c", "d")]);
    assert_eq!(cycles(&acyclic), Vec::<Vec<String>>::new());
}

fn files(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(p, t)| ((*p).to_owned(), (*t).to_owned()))
        .collect()
}

/// Each way of naming a module counts, and what only looks like one does not.
#[test]
fn the_reader_resolves_every_way_of_naming_a_module() {
    let krate = read_crate(&files(&[
        (
            "lib.rs",
            "pub mod a; pub mod b; pub mod c; pub mod nbd; pub use a::Thing;",
        ),
        // A re-export of the root, inside a macro call.
        ("b.rs", "pub fn g() { assert!(crate::Thing::ok()); }"),
        // `super::` from a file and from an inline module; a visibility and comments are not uses.
        (
            "nbd/mod.rs",
            "pub mod client; pub(crate) fn f() { client::go() } // crate::c::x",
        ),
        (
            "nbd/client.rs",
            "/// crate::b\n pub(in crate::c) fn go() { super::super::c::h(); } \
             #[cfg(test)] mod tests { use super::*; use crate::c::{self as cc}; }",
        ),
        (
            "c.rs",
            "use self::inner::X; mod inner { pub struct X; } pub fn h() {}",
        ),
        (
            "a.rs",
            "use crate::{b::g, nbd::client}; pub struct Thing; use std::io;",
        ),
    ]));
    assert!(krate.unresolved.is_empty(), "{:?}", krate.unresolved);
    assert_eq!(
        krate.graph(),
        graph(&[
            ("a", "b"),
            ("a", "nbd::client"),
            ("b", "a"),
            ("nbd", "nbd::client"),
            ("nbd::client", "c"),
        ])
    );
    assert_eq!(cycles(&krate.graph()), vec![vec!["a", "b", "a"]]);
}

#[test]
fn the_reader_reports_paths_it_cannot_place_and_pyo3_outside_the_binding() {
    let krate = read_crate(&files(&[
        ("lib.rs", "pub mod a; #[cfg(feature = \"python\")] mod py;"),
        (
            "a.rs",
            "// pyo3 in a comment is fine\n fn f() { crate::missing::x(); } \
                  #[cfg_attr(feature = \"python\", pyo3::pyclass)] struct S;",
        ),
        ("py/mod.rs", "use pyo3::prelude::*;"),
    ]));
    assert_eq!(krate.unresolved, vec!["a.rs: crate::missing::x"]);
    assert_eq!(krate.pyo3_outside_py, vec!["a.rs"]);
}
