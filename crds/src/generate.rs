//! Rendering the CRDs: one YAML document per resource, as checked in under
//! `crds/yaml/` and copied into the Helm chart.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

use crate::{Backend, Monitor, TestSession, Tube, WarmPool};

/// Every Tidepool CRD, in a stable order.
pub fn all() -> Vec<CustomResourceDefinition> {
    vec![WarmPool::crd(), TestSession::crd(), Backend::crd(), Tube::crd(), Monitor::crd()]
}

/// The file name a CRD is rendered to: `<plural>.<group>.yaml`.
pub fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

/// The YAML document for one CRD, with a header saying where it comes from.
pub fn render(crd: &CustomResourceDefinition) -> Result<String, serde_yaml::Error> {
    let body = serde_yaml::to_string(crd)?;
    Ok(format!(
        "# Generated from the Rust types in crds/src by `cargo run -p tidepool-crds --bin tidepool-crdgen`.\n# Do not edit by hand; a test fails when this file and the types differ.\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// The checked-in YAML must be exactly what the types generate.
    #[test]
    fn checked_in_yaml_matches_the_types() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("yaml");
        for crd in all() {
            let path = dir.join(file_name(&crd));
            let on_disk = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}; run tidepool-crdgen", path.display()));
            assert!(
                on_disk == render(&crd).unwrap(),
                "{} is out of date: run `cargo run -p tidepool-crds --bin tidepool-crdgen`",
                path.display()
            );
        }
        let files = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(files, all().len(), "crds/yaml holds a file that no type generates");
    }

    #[test]
    fn every_crd_has_status_and_printer_columns() {
        for crd in all() {
            let version = &crd.spec.versions[0];
            assert_eq!(version.name, crate::VERSION);
            assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
            assert!(!version.additional_printer_columns.as_deref().unwrap_or_default().is_empty());
            assert_eq!(crd.spec.group, crate::GROUP);
        }
    }
}
