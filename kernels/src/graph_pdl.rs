//! Programmatic dependent launch (PDL) inside recorded graphs.
//!
//! Launched eagerly with PDL, a W4A16 linear starts while the kernel
//! before it still runs: it streams its weights and waits
//! (`griddepcontrol.wait`) only to read its input. Stream capture keeps
//! that overlap only when the linear directly follows a kernel. In the
//! engine's recorded steps it rarely does: buffers the model dropped since
//! the producer are freed on the stream, and the linear's output is
//! allocated there just before its launch, so the capture holds
//!
//! ```text
//! P (producer kernel) → F… (frees) → A (the output's allocation) → L
//! ```
//!
//! and L waits for P to finish. A graph with memory nodes cannot have
//! edges removed afterwards (the driver refuses), so the splice happens
//! while capturing, through the capture's dependency set:
//!
//! 1. [`GpuDevice::begin_pdl_splice`], before the output is allocated:
//!    back from the capture's tail over free nodes (none is fine) to the
//!    last kernel P, the capture continues from P's own predecessors, so
//!    the allocation needs nothing of P (the graph's allocator then gives
//!    it memory apart from anything P's frees release).
//! 2. [`GpuDevice::link_pdl_splice`], right before the launch: the linear
//!    depends on P through a programmatic edge (P's port that fires once
//!    all its blocks have triggered; the engine's producers trigger at
//!    their start) and on the allocation. The linear is launched without
//!    the PDL attribute (`W4A16Linear::forward_plain`): in a graph the
//!    edge is what makes the dependency programmatic.
//! 3. [`GpuDevice::end_pdl_splice`], after the launch: checks that the
//!    linear got exactly those edges, then the old tail (the last free, or
//!    P) joins the dependency set, so later work, and later allocations
//!    that may reuse the freed memory, still follow it.
//!
//! Any driver error fails the recording; the engine then runs its steps
//! eagerly. Eager launches never splice.
//!
//! On an H100 (session 9) a 7B decode step recorded this way ran 14%
//! slower than one without PDL. The spliced graph is branched: the
//! allocation beside the producer, the frees after it joining later.
//! `LMQ_PDL_SPLICE=chain`, an experiment, removes the first branch: in
//! step 2 the producer is also made to wait for the allocation (an edge
//! added to the graph being captured), and the linear depends on the
//! producer alone, through the programmatic edge.

use std::sync::atomic::Ordering;

use cudarc::driver::sys;

use crate::device::GpuDevice;
use crate::error::{DriverContext, KernelError, Result};

type Node = sys::CUgraphNode;
type Edge = sys::CUgraphEdgeData;

/// What [`GpuDevice::begin_pdl_splice`] found: the producer, and the
/// capture's tail before the splice. It must reach
/// [`GpuDevice::end_pdl_splice`], or the frees it stepped over stay out of
/// the capture's order.
#[must_use]
pub struct PdlSplice {
    producer: Node,
    tail: Node,
    /// The allocations the link step found (for the end step's check).
    allocs: Vec<Node>,
}

impl std::fmt::Debug for PdlSplice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PdlSplice")
    }
}

fn splice_error(detail: &str) -> KernelError {
    KernelError::invalid("PDL splice", detail.to_string())
}

/// A default (full-completion) edge: all fields zero, as the driver reads
/// a NULL edge array.
fn default_edge() -> Edge {
    Edge {
        from_port: 0,
        to_port: 0,
        type_: 0,
        reserved: [0; 5],
    }
}

/// `LMQ_PDL_SPLICE=chain` (see the module header).
fn chain_mode() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LMQ_PDL_SPLICE").is_ok_and(|v| v == "chain"))
}

impl GpuDevice {
    /// Step 1 (see the module header), while the stream is recorded:
    /// `Some` when the splice applies and the capture now continues from
    /// the producer's predecessors, `None` when nothing was changed.
    pub fn begin_pdl_splice(&self) -> Result<Option<PdlSplice>> {
        if !self.is_recording() {
            return Ok(None);
        }
        let deps = self.capture_dependencies()?;
        let [(tail, edge)] = deps.as_slice() else {
            return Ok(None);
        };
        if edge.type_ != 0 {
            return Ok(None);
        }
        // Back over frees only: an allocation stepped over would end up
        // unordered with the linear, which might use it.
        let mut cur = *tail;
        let producer = loop {
            use sys::CUgraphNodeType::*;
            match node_type(cur)? {
                CU_GRAPH_NODE_TYPE_MEM_FREE => {
                    let Some(d) = node_dependencies(cur)? else {
                        return Ok(None);
                    };
                    let [(prev, e)] = d.as_slice() else {
                        return Ok(None);
                    };
                    if e.type_ != 0 {
                        return Ok(None);
                    }
                    cur = *prev;
                }
                CU_GRAPH_NODE_TYPE_KERNEL => break cur,
                _ => return Ok(None),
            }
        };
        // The allocation follows the producer's predecessors, through
        // ordinary edges (a programmatic edge must end at a kernel). A
        // producer with none (the graph's first node) is left alone.
        let Some(preds) = node_dependencies(producer)? else {
            return Ok(None);
        };
        if preds.is_empty() {
            return Ok(None);
        }
        let preds: Vec<Node> = preds.into_iter().map(|(n, _)| n).collect();
        self.set_capture_dependencies(&preds, &vec![default_edge(); preds.len()], true)?;
        Ok(Some(PdlSplice {
            producer,
            tail: *tail,
            allocs: Vec::new(),
        }))
    }

    /// Step 2: the next launch depends on the producer programmatically and
    /// on what the capture added since step 1 (the output's allocation).
    pub fn link_pdl_splice(&self, splice: &mut PdlSplice) -> Result<()> {
        let since: Vec<Node> = self
            .capture_dependencies()?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let mut nodes = vec![splice.producer];
        let mut edges = vec![Edge {
            from_port: sys::CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC as u8,
            to_port: 0,
            type_: sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8,
            reserved: [0; 5],
        }];
        if chain_mode() {
            // The producer waits for the allocations, so the linear, after
            // the producer, is after them too.
            let graph = self.capture_graph()?;
            for &alloc in &since {
                let edge = default_edge();
                // SAFETY: `graph` is the graph being captured on this
                // device's stream; `alloc` (captured since step 1) and the
                // producer are nodes of it; one node each side and one
                // edge's data are passed.
                unsafe {
                    sys::cuGraphAddDependencies_v2(graph, &alloc, &splice.producer, &edge, 1)
                }
                .result()
                .during("ordering an allocation before the PDL producer")?;
            }
            splice.allocs = Vec::new();
        } else {
            splice.allocs = since.clone();
            nodes.extend(&since);
            edges.extend(std::iter::repeat_n(default_edge(), since.len()));
        }
        self.set_capture_dependencies(&nodes, &edges, true)?;
        self.pdl_splices.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Programmatic edges spliced into recordings by this device so far.
    pub fn pdl_splices(&self) -> usize {
        self.pdl_splices.load(Ordering::Relaxed)
    }

    /// Step 3, after the linear's launch: checks that the linear got the
    /// edges asked for (a programmatic one from the producer, ordinary ones
    /// from the allocations), then adds the old tail to the dependency set.
    pub fn end_pdl_splice(&self, splice: PdlSplice) -> Result<()> {
        let now = self.capture_dependencies()?;
        let [(linear, _)] = now.as_slice() else {
            return Err(splice_error(
                "the capture has no single node after the linear",
            ));
        };
        let Some(deps) = node_dependencies(*linear)? else {
            return Err(splice_error("the linear has too many dependencies"));
        };
        let programmatic = |e: &Edge| {
            e.type_ == sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8
                && e.from_port == sys::CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC as u8
        };
        let from_producer = deps
            .iter()
            .filter(|(n, e)| *n == splice.producer && programmatic(e))
            .count();
        let from_allocs = deps
            .iter()
            .filter(|(n, e)| splice.allocs.contains(n) && e.type_ == 0)
            .count();
        if from_producer != 1 || from_allocs != splice.allocs.len() || deps.len() != 1 + from_allocs
        {
            return Err(splice_error(
                "the linear's edges are not the programmatic one from its producer and the allocations'",
            ));
        }
        self.set_capture_dependencies(&[splice.tail], &[default_edge()], false)
    }

    /// The graph the stream is being captured into.
    fn capture_graph(&self) -> Result<sys::CUgraph> {
        let (graph, _) = self.capture_info()?;
        if graph.is_null() {
            return Err(splice_error("the capture has no graph"));
        }
        Ok(graph)
    }

    /// The capture's current dependency set (the nodes the next captured
    /// work will depend on), with their edges.
    fn capture_dependencies(&self) -> Result<Vec<(Node, Edge)>> {
        self.capture_info().map(|(_, deps)| deps)
    }

    /// The graph being captured and the capture's dependency set.
    fn capture_info(&self) -> Result<(sys::CUgraph, Vec<(Node, Edge)>)> {
        let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        let mut graph: sys::CUgraph = std::ptr::null_mut();
        let mut deps: *const Node = std::ptr::null();
        let mut edges: *const Edge = std::ptr::null();
        let mut n = 0usize;
        self.context()
            .bind_to_thread()
            .during("binding the context")?;
        // SAFETY: the stream is this device's; the out-pointers are valid
        // locals; the id output may be NULL.
        unsafe {
            sys::cuStreamGetCaptureInfo_v3(
                self.stream().cu_stream(),
                &mut status,
                std::ptr::null_mut(),
                &mut graph,
                &mut deps,
                &mut edges,
                &mut n,
            )
        }
        .result()
        .during("reading the capture's state")?;
        if status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE {
            return Err(KernelError::invalid(
                "PDL splice",
                "the stream is not being captured",
            ));
        }
        if n == 0 || deps.is_null() {
            return Ok((graph, Vec::new()));
        }
        // SAFETY: the driver returned `n` nodes (and, when `edges` is not
        // NULL, `n` edges) that stay valid until the next call on the
        // stream; they are copied out at once. A NULL edge array means
        // default edges.
        let nodes = unsafe { std::slice::from_raw_parts(deps, n) };
        let deps = nodes
            .iter()
            .enumerate()
            .map(|(i, &node)| {
                let edge = if edges.is_null() {
                    default_edge()
                } else {
                    // SAFETY: as above, `edges` holds `n` entries.
                    unsafe { *edges.add(i) }
                };
                (node, edge)
            })
            .collect();
        Ok((graph, deps))
    }

    /// Replaces (`set`) or extends the capture's dependency set.
    fn set_capture_dependencies(&self, nodes: &[Node], edges: &[Edge], set: bool) -> Result<()> {
        if nodes.len() != edges.len() {
            return Err(splice_error("nodes and edge data differ in length"));
        }
        let flags = if set {
            sys::CUstreamUpdateCaptureDependencies_flags::CU_STREAM_SET_CAPTURE_DEPENDENCIES
        } else {
            sys::CUstreamUpdateCaptureDependencies_flags::CU_STREAM_ADD_CAPTURE_DEPENDENCIES
        };
        let mut nodes = nodes.to_vec();
        // SAFETY: the stream is this device's and being captured (checked
        // by the caller's `capture_dependencies`); `nodes` and `edges` are
        // nodes of its graph and their edge data, equally long.
        unsafe {
            sys::cuStreamUpdateCaptureDependencies_v2(
                self.stream().cu_stream(),
                nodes.as_mut_ptr(),
                edges.as_ptr(),
                nodes.len(),
                flags as u32,
            )
        }
        .result()
        .during("changing the capture's dependencies")
    }
}

fn node_type(node: Node) -> Result<sys::CUgraphNodeType> {
    let mut t = sys::CUgraphNodeType::CU_GRAPH_NODE_TYPE_EMPTY;
    // SAFETY: `node` came from the driver as a node of the graph being
    // captured, which lives until the capture ends.
    unsafe { sys::cuGraphNodeGetType(node, &mut t) }
        .result()
        .during("reading a graph node's type")?;
    Ok(t)
}

/// The nodes `node` depends on, with their edges; `None` when there are
/// 16 or more, more than a splice ever needs to look at. Both arrays are always passed:
/// a count-only query fails on non-default edges (`CUDA_ERROR_LOSSY_QUERY`).
fn node_dependencies(node: Node) -> Result<Option<Vec<(Node, Edge)>>> {
    const CAPACITY: usize = 16;
    let mut nodes = vec![std::ptr::null_mut(); CAPACITY];
    let mut edges = vec![default_edge(); CAPACITY];
    let mut n = CAPACITY;
    // SAFETY: as in `node_type`; both arrays hold `CAPACITY` entries and
    // `n` says so; the driver writes at most that many and returns the
    // number it wrote.
    unsafe {
        sys::cuGraphNodeGetDependencies_v2(node, nodes.as_mut_ptr(), edges.as_mut_ptr(), &mut n)
    }
    .result()
    .during("listing a node's dependencies")?;
    if n >= CAPACITY {
        return Ok(None);
    }
    Ok(Some(nodes.into_iter().zip(edges).take(n).collect()))
}
