//! The image's directory tree in memory: what the squashfs tables describe.
//!
//! Nodes are inodes; a directory maps names to nodes, and a hard link is a second name for
//! the same node. Nodes nothing names any more (removed by a whiteout, replaced) stay in
//! the arena and are simply not written.

use std::collections::BTreeMap;

pub type NodeId = usize;

/// Owner, permission bits (set-id and sticky included) and mtime of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u32,
}

/// Where a file's contents went: `blocks` consecutive data blocks from `first_block` of
/// its stream (in the order they were handed to the writer; see `Data::fork`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileData {
    pub size: u64,
    pub stream: usize,
    pub first_block: u64,
    pub blocks: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Entries by name, in byte order (the order squashfs directories are searched in).
    Dir(BTreeMap<Box<[u8]>, NodeId>),
    File(FileData),
    Symlink(Box<[u8]>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    pub meta: Meta,
}

#[derive(Debug, Clone)]
pub struct Tree {
    nodes: Vec<Node>,
}

impl Default for Tree {
    fn default() -> Self {
        Tree::new()
    }
}

impl Tree {
    /// An empty root directory, 0755 root:root (what a root unpack made of the root).
    pub fn new() -> Tree {
        Tree {
            nodes: vec![Node {
                kind: Kind::Dir(BTreeMap::new()),
                meta: Meta {
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                    mtime: 0,
                },
            }],
        }
    }

    pub const ROOT: NodeId = 0;

    pub fn add(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id]
    }

    /// The entries of `id` if it is a directory.
    pub fn entries(&self, id: NodeId) -> Option<&BTreeMap<Box<[u8]>, NodeId>> {
        match &self.nodes[id].kind {
            Kind::Dir(entries) => Some(entries),
            _ => None,
        }
    }

    pub fn entries_mut(&mut self, id: NodeId) -> Option<&mut BTreeMap<Box<[u8]>, NodeId>> {
        match &mut self.nodes[id].kind {
            Kind::Dir(entries) => Some(entries),
            _ => None,
        }
    }

    /// The node a normalised path (`a/b/c`, "" for the root) names, following no symlink.
    pub fn lookup(&self, path: &[u8]) -> Option<NodeId> {
        if path.is_empty() {
            return Some(Tree::ROOT);
        }
        path.split(|b| *b == b'/')
            .try_fold(Tree::ROOT, |dir, name| {
                self.entries(dir)?.get(name).copied()
            })
    }
}
