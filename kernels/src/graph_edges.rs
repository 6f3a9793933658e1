//! Programmatic edges for recorded graphs: the graph form of programmatic
//! dependent launch (PDL).
//!
//! Launched eagerly with PDL, a W4A16 linear starts while the kernel
//! before it still runs: it streams its weights and waits
//! (`griddepcontrol.wait`) only to read its input. Stream capture keeps
//! that overlap only when the linear directly follows a kernel. In the
//! engine's recorded steps it never does: the linear's output is allocated
//! on the stream just before its launch, and buffers the model dropped
//! since the producer are freed there too, so the capture holds
//!
//! ```text
//! P (producer kernel) → F… (frees) → A… (allocations) → L (linear)
//! ```
//!
//! with ordinary edges, and L waits for P to finish. This pass rewrites
//! each such chain (memory nodes only, one in and one out each) to
//!
//! ```text
//! P ─programmatic→ L      preds(P) → A… → L      P → F… → succ(L)
//! ```
//!
//! - The allocations move off the chain: they need nothing of P, and the
//!   graph's allocator, which assigns memory by the graph's order, gives
//!   memory it no longer orders after P's frees other addresses.
//! - The frees stay after P (they free buffers P may read) and now come
//!   before L's successors, so later allocations can still reuse that
//!   memory.
//! - P's programmatic port fires when all its blocks have triggered (the
//!   engine's producers trigger at their start), and L's own wait still
//!   holds it until P is complete.
//!
//! Only kernels launched with PDL are rewritten ([`GpuDevice`] notes their
//! functions): they alone wait before reading their input. Every chain is
//! planned before the graph changes, and any failure while changing it
//! fails the recording (the caller then runs steps eagerly), so a graph is
//! never left half rewritten.

use std::collections::HashSet;

use cudarc::driver::sys;

use crate::error::{DriverContext, Result};

type Node = sys::CUgraphNode;

// SAFETY (every `unsafe fn` below): callers pass only the handle of a
// valid, uninstantiated graph, or nodes of it, which no other thread
// touches meanwhile; the driver calls need nothing else, and every buffer
// they fill is sized from the count the driver returned just before.

/// One chain to rewrite: producer, memory nodes in graph order, linear.
struct Chain {
    producer: Node,
    frees: Vec<Node>,
    allocs: Vec<Node>,
    /// Every node between the producer and the linear, in graph order.
    path: Vec<Node>,
    linear: Node,
}

/// Rewrites `graph` as described above for kernels whose functions are in
/// `pdl` (as `CUfunction` addresses); returns the programmatic edges
/// added.
///
/// # Safety
/// `graph` must be a valid, uninstantiated graph that no other thread
/// uses during the call.
pub(crate) unsafe fn add_programmatic_edges(
    graph: sys::CUgraph,
    pdl: &HashSet<usize>,
) -> Result<usize> {
    if pdl.is_empty() {
        return Ok(0);
    }
    let mut chains = Vec::new();
    for node in nodes(graph)? {
        if let Some(chain) = plan(node, pdl)? {
            chains.push(chain);
        }
    }
    for c in &chains {
        rewrite(graph, c)?;
    }
    Ok(chains.len())
}

/// The chain ending at `linear`, if it is a PDL kernel behind memory nodes
/// that follow a kernel.
unsafe fn plan(linear: Node, pdl: &HashSet<usize>) -> Result<Option<Chain>> {
    if node_type(linear)? != sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_KERNEL {
        return Ok(None);
    }
    let mut params: sys::CUDA_KERNEL_NODE_PARAMS = std::mem::zeroed();
    sys::cuGraphKernelNodeGetParams_v2(linear, &mut params)
        .result()
        .during("reading a kernel node")?;
    if !pdl.contains(&(params.func as usize)) {
        return Ok(None);
    }
    let mut back = Vec::new();
    let mut cur = linear;
    let producer = loop {
        let deps = dependencies(cur)?;
        // One ordinary edge in (a programmatic one means the capture made
        // the edge itself), one edge out for the memory nodes.
        let [(prev, data)] = deps.as_slice() else {
            return Ok(None);
        };
        if data.type_ != 0 || (cur != linear && dependents(cur)? != 1) {
            return Ok(None);
        }
        use sys::CUgraphNodeType::*;
        match node_type(*prev)? {
            CU_GRAPH_NODE_TYPE_MEM_ALLOC | CU_GRAPH_NODE_TYPE_MEM_FREE => {
                back.push(*prev);
                cur = *prev;
            }
            CU_GRAPH_NODE_TYPE_KERNEL if dependents(*prev)? == 1 => break *prev,
            _ => return Ok(None),
        }
    };
    back.reverse();
    let mut frees = Vec::new();
    let mut allocs = Vec::new();
    for &n in &back {
        if node_type(n)? == sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_MEM_FREE {
            frees.push(n);
        } else {
            allocs.push(n);
        }
    }
    Ok(Some(Chain {
        producer,
        frees,
        allocs,
        path: back,
        linear,
    }))
}

unsafe fn rewrite(graph: sys::CUgraph, c: &Chain) -> Result<()> {
    // Drop the chain's edges: producer → path… → linear.
    let mut from = vec![c.producer];
    from.extend(&c.path);
    let mut to = c.path.clone();
    to.push(c.linear);
    edges(graph, &from, &to, None, Edit::Remove)?;
    // The frees, in their order, after the producer.
    let mut last = c.producer;
    for &f in &c.frees {
        edges(graph, &[last], &[f], None, Edit::Add)?;
        last = f;
    }
    // The allocations after the producer's own predecessors, before the
    // linear.
    let before_producer: Vec<Node> = dependencies(c.producer)?
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for &a in &c.allocs {
        for &p in &before_producer {
            edges(graph, &[p], &[a], None, Edit::Add)?;
        }
        edges(graph, &[a], &[c.linear], None, Edit::Add)?;
    }
    let programmatic = sys::CUgraphEdgeData {
        from_port: sys::CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC as u8,
        to_port: 0,
        type_: sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8,
        reserved: [0; 5],
    };
    edges(
        graph,
        &[c.producer],
        &[c.linear],
        Some(programmatic),
        Edit::Add,
    )?;
    // The last free before whatever followed the linear.
    if last != c.producer {
        for (s, _) in dependents_of(c.linear)? {
            edges(graph, &[last], &[s], None, Edit::Add)?;
        }
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Edit {
    Add,
    Remove,
}

/// Adds or removes the edges `from[i] → to[i]`, ordinary or with `data`.
unsafe fn edges(
    graph: sys::CUgraph,
    from: &[Node],
    to: &[Node],
    data: Option<sys::CUgraphEdgeData>,
    edit: Edit,
) -> Result<()> {
    debug_assert_eq!(from.len(), to.len());
    let data: Vec<sys::CUgraphEdgeData> = match data {
        Some(d) => vec![d; from.len()],
        None => vec![std::mem::zeroed(); from.len()],
    };
    match edit {
        Edit::Add => sys::cuGraphAddDependencies_v2(
            graph,
            from.as_ptr(),
            to.as_ptr(),
            data.as_ptr(),
            from.len(),
        )
        .result()
        .during("adding graph edges"),
        Edit::Remove => sys::cuGraphRemoveDependencies_v2(
            graph,
            from.as_ptr(),
            to.as_ptr(),
            data.as_ptr(),
            from.len(),
        )
        .result()
        .during("removing graph edges"),
    }
}

unsafe fn nodes(graph: sys::CUgraph) -> Result<Vec<Node>> {
    let mut n = 0usize;
    sys::cuGraphGetNodes(graph, std::ptr::null_mut(), &mut n)
        .result()
        .during("counting graph nodes")?;
    let mut out = vec![std::ptr::null_mut(); n];
    sys::cuGraphGetNodes(graph, out.as_mut_ptr(), &mut n)
        .result()
        .during("listing graph nodes")?;
    out.truncate(n);
    Ok(out)
}

unsafe fn node_type(node: Node) -> Result<sys::CUgraphNodeType> {
    let mut t = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
    sys::cuGraphNodeGetType(node, &mut t)
        .result()
        .during("reading a graph node's type")?;
    Ok(t)
}

/// The nodes `node` depends on, with their edges' data.
unsafe fn dependencies(node: Node) -> Result<Vec<(Node, sys::CUgraphEdgeData)>> {
    let mut n = 0usize;
    sys::cuGraphNodeGetDependencies_v2(node, std::ptr::null_mut(), std::ptr::null_mut(), &mut n)
        .result()
        .during("counting a node's dependencies")?;
    let mut nodes = vec![std::ptr::null_mut(); n];
    let mut data = vec![std::mem::zeroed::<sys::CUgraphEdgeData>(); n];
    sys::cuGraphNodeGetDependencies_v2(node, nodes.as_mut_ptr(), data.as_mut_ptr(), &mut n)
        .result()
        .during("listing a node's dependencies")?;
    Ok(nodes.into_iter().zip(data).take(n).collect())
}

/// The nodes that depend on `node`, with their edges' data.
unsafe fn dependents_of(node: Node) -> Result<Vec<(Node, sys::CUgraphEdgeData)>> {
    let mut n = 0usize;
    sys::cuGraphNodeGetDependentNodes_v2(node, std::ptr::null_mut(), std::ptr::null_mut(), &mut n)
        .result()
        .during("counting a node's dependents")?;
    let mut nodes = vec![std::ptr::null_mut(); n];
    let mut data = vec![std::mem::zeroed::<sys::CUgraphEdgeData>(); n];
    sys::cuGraphNodeGetDependentNodes_v2(node, nodes.as_mut_ptr(), data.as_mut_ptr(), &mut n)
        .result()
        .during("listing a node's dependents")?;
    Ok(nodes.into_iter().zip(data).take(n).collect())
}

unsafe fn dependents(node: Node) -> Result<usize> {
    dependents_of(node).map(|d| d.len())
}
