//! Fake nodes for kwok to manage.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeStatus};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::ObjectMeta;

/// A node that exists only in the API server; kwok keeps it Ready and runs
/// the pods scheduled onto it.
#[derive(Clone, Debug)]
pub struct FakeNode {
    pub name: String,
    pub cpu: String,
    pub memory: String,
    pub pods: u32,
    pub gpus: u32,
    pub labels: BTreeMap<String, String>,
}

impl FakeNode {
    /// An 8-core, 32 GiB node with room for 250 pods and no GPUs.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            cpu: "8".into(),
            memory: "32Gi".into(),
            pods: 250,
            gpus: 0,
            labels: BTreeMap::new(),
        }
    }

    pub fn cpu(mut self, cpu: &str) -> Self {
        self.cpu = cpu.to_string();
        self
    }

    pub fn memory(mut self, memory: &str) -> Self {
        self.memory = memory.to_string();
        self
    }

    pub fn pods(mut self, pods: u32) -> Self {
        self.pods = pods;
        self
    }

    /// Advertises `nvidia.com/gpu` as the NVIDIA device plugin would.
    pub fn gpus(mut self, gpus: u32) -> Self {
        self.gpus = gpus;
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_string(), value.to_string());
        self
    }

    /// The Node object to create.
    pub fn to_node(&self) -> Node {
        let mut labels = self.labels.clone();
        labels.insert("kubernetes.io/hostname".into(), self.name.clone());
        labels.insert("kubernetes.io/os".into(), "linux".into());
        labels.insert("kubernetes.io/arch".into(), "amd64".into());
        labels.insert("type".into(), "kwok".into());
        let mut resources = BTreeMap::from([
            ("cpu".to_string(), Quantity(self.cpu.clone())),
            ("memory".to_string(), Quantity(self.memory.clone())),
            ("pods".to_string(), Quantity(self.pods.to_string())),
        ]);
        if self.gpus > 0 {
            resources.insert("nvidia.com/gpu".into(), Quantity(self.gpus.to_string()));
        }
        Node {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(labels),
                annotations: Some(BTreeMap::from([
                    ("kwok.x-k8s.io/node".to_string(), "fake".to_string()),
                    ("node.alpha.kubernetes.io/ttl".to_string(), "0".to_string()),
                ])),
                ..Default::default()
            },
            spec: None,
            status: Some(NodeStatus {
                allocatable: Some(resources.clone()),
                capacity: Some(resources),
                ..Default::default()
            }),
        }
    }
}
