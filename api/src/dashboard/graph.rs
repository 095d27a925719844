//! A directed graph drawn as SVG on the server: nodes in layers (longest path from a root),
//! left to right, edges as curves. Used for a run's chain (parent → children) and meant for
//! any other set of nodes and edges (workflow runs): it knows nothing of jobs.

use std::collections::HashMap;
use std::fmt::Write;

use super::ansi::escape;

/// A node: `id` is what edges name; `class` is added to its `<g>` (a status, say) and
/// `href`, when set, makes it a link.
#[derive(Debug, Clone)]
pub struct Node {
    pub id: String,
    pub label: String,
    pub sublabel: String,
    pub class: String,
    pub href: Option<String>,
    /// Drawn with a thicker outline (the node the page is about).
    pub current: bool,
}

#[derive(Debug, Clone)]
pub struct Edge {
    pub from: String,
    pub to: String,
}

const W: i64 = 190;
const H: i64 = 46;
const GAP_X: i64 = 60;
const GAP_Y: i64 = 18;
const PAD: i64 = 8;
const MAX_LABEL: usize = 24;

/// Each node's layer: 0 for nodes without a parent, else one more than its deepest parent.
/// Edges to unknown nodes are ignored; a cycle stops growing after as many rounds as nodes.
pub fn layers(nodes: &[Node], edges: &[Edge]) -> HashMap<String, usize> {
    let mut layer: HashMap<String, usize> = nodes.iter().map(|n| (n.id.clone(), 0)).collect();
    for _ in 0..nodes.len() {
        let mut changed = false;
        for e in edges {
            let (Some(&from), Some(&to)) = (layer.get(&e.from), layer.get(&e.to)) else {
                continue;
            };
            // A layer never exceeds the node count (a cycle stops there).
            if to < from + 1 && from + 1 < nodes.len() {
                layer.insert(e.to.clone(), from + 1);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    layer
}

/// The SVG (with a title for screen readers). Nodes keep their given order within a layer.
pub fn svg(title: &str, nodes: &[Node], edges: &[Edge]) -> String {
    let layer = layers(nodes, edges);
    let mut rows: HashMap<usize, usize> = HashMap::new();
    let mut at: HashMap<&str, (i64, i64)> = HashMap::new();
    for n in nodes {
        let l = layer.get(&n.id).copied().unwrap_or(0);
        let row = rows.entry(l).or_insert(0);
        let x = PAD + l as i64 * (W + GAP_X);
        let y = PAD + *row as i64 * (H + GAP_Y);
        *row += 1;
        at.insert(n.id.as_str(), (x, y));
    }
    let width = at.values().map(|(x, _)| x + W + PAD).max().unwrap_or(W);
    let height = at.values().map(|(_, y)| y + H + PAD).max().unwrap_or(H);
    let mut out = String::new();
    let _ = write!(
        out,
        "<svg class=\"graph\" role=\"img\" aria-labelledby=\"graph-title\" viewBox=\"0 0 {width} {height}\" \
         width=\"{width}\" height=\"{height}\" xmlns=\"http://www.w3.org/2000/svg\">\
         <title id=\"graph-title\">{}</title>",
        escape(title)
    );
    out.push_str(
        "<defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"7\" \
         markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M 0 0 L 10 5 L 0 10 z\" class=\"edge-head\"/></marker></defs>",
    );
    for e in edges {
        let (Some(&(x1, y1)), Some(&(x2, y2))) = (at.get(e.from.as_str()), at.get(e.to.as_str()))
        else {
            continue;
        };
        let (sx, sy, tx, ty) = (x1 + W, y1 + H / 2, x2, y2 + H / 2);
        let mid = (sx + tx) / 2;
        let _ = write!(
            out,
            "<path class=\"edge\" d=\"M {sx} {sy} C {mid} {sy}, {mid} {ty}, {tx} {ty}\" marker-end=\"url(#arrow)\"/>"
        );
    }
    for n in nodes {
        let Some(&(x, y)) = at.get(n.id.as_str()) else {
            continue;
        };
        let classes = format!(
            "node {}{}",
            escape(&n.class),
            if n.current { " current" } else { "" }
        );
        if let Some(href) = &n.href {
            let _ = write!(out, "<a href=\"{}\">", escape(href));
        }
        let _ = write!(
            out,
            "<g class=\"{classes}\" data-id=\"{}\"><rect x=\"{x}\" y=\"{y}\" width=\"{W}\" height=\"{H}\" rx=\"6\"/>\
             <text x=\"{}\" y=\"{}\" class=\"label\">{}</text><text x=\"{}\" y=\"{}\" class=\"sublabel\">{}</text></g>",
            escape(&n.id),
            x + 10,
            y + 19,
            escape(&truncate(&n.label)),
            x + 10,
            y + 36,
            escape(&truncate(&n.sublabel)),
        );
        if n.href.is_some() {
            out.push_str("</a>");
        }
    }
    out.push_str("</svg>");
    out
}

fn truncate(text: &str) -> String {
    if text.chars().count() <= MAX_LABEL {
        text.to_owned()
    } else {
        let mut t: String = text.chars().take(MAX_LABEL - 1).collect();
        t.push('…');
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str) -> Node {
        Node {
            id: id.into(),
            label: format!("<{id}>"),
            sublabel: "succeeded".into(),
            class: "succeeded".into(),
            href: Some(format!("/runs/{id}")),
            current: id == "b",
        }
    }

    fn edge(from: &str, to: &str) -> Edge {
        Edge {
            from: from.into(),
            to: to.into(),
        }
    }

    #[test]
    fn layers_follow_the_longest_path_and_survive_cycles() {
        let nodes: Vec<Node> = ["a", "b", "c", "d"].iter().map(|i| node(i)).collect();
        let edges = vec![
            edge("a", "b"),
            edge("b", "c"),
            edge("a", "c"),
            edge("a", "d"),
        ];
        let l = layers(&nodes, &edges);
        assert_eq!((l["a"], l["b"], l["c"], l["d"]), (0, 1, 2, 1));
        let cyclic = vec![edge("a", "b"), edge("b", "a")];
        let l = layers(&nodes[..2], &cyclic);
        assert!(l["a"] <= 1 && l["b"] <= 1);
    }

    #[test]
    fn draws_one_group_per_node_escaped() {
        let nodes: Vec<Node> = ["a", "b", "c"].iter().map(|i| node(i)).collect();
        let svg = svg("chain <x>", &nodes, &[edge("a", "b"), edge("b", "c")]);
        assert_eq!(svg.matches("<g class=\"node").count(), 3);
        assert_eq!(svg.matches("class=\"edge\"").count(), 2);
        assert!(svg.contains("&lt;a&gt;") && !svg.contains("<a>"));
        assert!(svg.contains("node succeeded current"));
        assert!(svg.contains("chain &lt;x&gt;"));
    }
}
