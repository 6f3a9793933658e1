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
//!    if memory nodes separate the capture's tail from the last kernel P,
//!    the capture continues from P's own predecessors, so the allocation
//!    needs nothing of P (the graph's allocator then gives it memory apart
//!    from anything P's frees release).
//! 2. [`GpuDevice::link_pdl_splice`], before the launch: the linear
//!    depends on P through a programmatic edge (P's port that fires once
//!    all its blocks have triggered; the engine's producers trigger at
//!    their start) and on the allocation.
//! 3. [`GpuDevice::end_pdl_splice`], after the launch: the old tail (the
//!    last free) joins the dependency set, so later work, and later
//!    allocations that may reuse the freed memory, still follow it.
//!
//! Any driver error fails the recording; the engine then runs its steps
//! eagerly. Eager launches never splice.

use std::sync::atomic::Ordering;

use cudarc::driver::sys;

use crate::device::GpuDevice;
use crate::error::{DriverContext, KernelError, Result};

type Node = sys::CUgraphNode;
type Edge = sys::CUgraphEdgeData;

/// What [`GpuDevice::begin_pdl_splice`] found: the producer, and the
/// capture's tail before the splice.
pub struct PdlSplice {
    producer: Node,
    tail: Node,
}

impl std::fmt::Debug for PdlSplice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PdlSplice")
    }
}

/// A default (full-completion) edge.
fn default_edge() -> Edge {
    // SAFETY: the edge data is four byte fields and padding; all zeros is
    // the default edge, as the driver documents for a NULL edge array.
    unsafe { std::mem::zeroed() }
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
        let mut cur = *tail;
        let mut crossed = false;
        let producer = loop {
            use sys::CUgraphNodeType::*;
            match node_type(cur)? {
                CU_GRAPH_NODE_TYPE_MEM_ALLOC | CU_GRAPH_NODE_TYPE_MEM_FREE => {
                    let d = node_dependencies(cur)?;
                    let [(prev, e)] = d.as_slice() else {
                        return Ok(None);
                    };
                    if e.type_ != 0 {
                        return Ok(None);
                    }
                    cur = *prev;
                    crossed = true;
                }
                CU_GRAPH_NODE_TYPE_KERNEL => break cur,
                _ => return Ok(None),
            }
        };
        // A kernel right before: the capture makes the edge itself.
        if !crossed {
            return Ok(None);
        }
        // The allocation may follow the producer's predecessors only
        // through ordinary edges (a programmatic edge must end at a
        // kernel).
        let preds: Vec<Node> = node_dependencies(producer)?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        self.set_capture_dependencies(&preds, &vec![default_edge(); preds.len()], true)?;
        Ok(Some(PdlSplice {
            producer,
            tail: *tail,
        }))
    }

    /// Step 2: the next launch depends on the producer programmatically and
    /// on what the capture added since step 1 (the output's allocation).
    pub fn link_pdl_splice(&self, splice: &PdlSplice) -> Result<()> {
        let since: Vec<Node> = self
            .capture_dependencies()?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let mut nodes = vec![splice.producer];
        nodes.extend(&since);
        let mut edges = vec![Edge {
            from_port: sys::CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC as u8,
            to_port: 0,
            type_: sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8,
            reserved: [0; 5],
        }];
        edges.extend(std::iter::repeat_n(default_edge(), since.len()));
        self.set_capture_dependencies(&nodes, &edges, true)?;
        self.pdl_splices.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Programmatic edges spliced into recordings by this device so far.
    pub fn pdl_splices(&self) -> usize {
        self.pdl_splices.load(Ordering::Relaxed)
    }

    /// Step 3: the old tail joins the dependency set again.
    pub fn end_pdl_splice(&self, splice: PdlSplice) -> Result<()> {
        self.set_capture_dependencies(&[splice.tail], &[default_edge()], false)
    }

    /// The capture's current dependency set (the nodes the next captured
    /// work will depend on), with their edges.
    fn capture_dependencies(&self) -> Result<Vec<(Node, Edge)>> {
        let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        let mut deps: *const Node = std::ptr::null();
        let mut edges: *const Edge = std::ptr::null();
        let mut n = 0usize;
        self.context()
            .bind_to_thread()
            .during("binding the context")?;
        // SAFETY: the stream is this device's; the out-pointers are valid
        // locals; the id and graph outputs may be NULL.
        unsafe {
            sys::cuStreamGetCaptureInfo_v3(
                self.stream().cu_stream(),
                &mut status,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                &mut deps,
                &mut edges,
                &mut n,
            )
        }
        .result()
        .during("reading the capture's dependencies")?;
        if status != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE {
            return Err(KernelError::invalid(
                "PDL splice",
                "the stream is not being captured",
            ));
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        // SAFETY: the driver returned `n` nodes (and, when `edges` is not
        // NULL, `n` edges) that stay valid until the next call on the
        // stream; they are copied out at once. A NULL edge array means
        // default edges.
        let nodes = unsafe { std::slice::from_raw_parts(deps, n) };
        Ok(nodes
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
            .collect())
    }

    /// Replaces (`set`) or extends the capture's dependency set.
    fn set_capture_dependencies(&self, nodes: &[Node], edges: &[Edge], set: bool) -> Result<()> {
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

/// The nodes `node` depends on, with their edges.
fn node_dependencies(node: Node) -> Result<Vec<(Node, Edge)>> {
    let mut n = 0usize;
    // SAFETY: as in `node_type`; NULL arrays ask for the count only.
    unsafe {
        sys::cuGraphNodeGetDependencies_v2(node, std::ptr::null_mut(), std::ptr::null_mut(), &mut n)
    }
    .result()
    .during("counting a node's dependencies")?;
    let mut nodes = vec![std::ptr::null_mut(); n];
    let mut edges = vec![default_edge(); n];
    // SAFETY: as above; both arrays hold `n` entries.
    unsafe {
        sys::cuGraphNodeGetDependencies_v2(node, nodes.as_mut_ptr(), edges.as_mut_ptr(), &mut n)
    }
    .result()
    .during("listing a node's dependencies")?;
    Ok(nodes.into_iter().zip(edges).take(n).collect())
}
