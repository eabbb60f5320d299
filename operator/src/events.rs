//! Kubernetes Events about Tidepool's objects. Decisions return what to say
//! as [`Notice`]s; the controllers publish them.

use kube::Resource;
use kube::runtime::events::{Event, EventType, Recorder};

/// An Event a decision asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub warning: bool,
    /// CamelCase, from `conditions::reason`.
    pub reason: &'static str,
    pub note: String,
}

impl Notice {
    pub fn normal(reason: &'static str, note: impl Into<String>) -> Self {
        Self { warning: false, reason, note: note.into() }
    }

    pub fn warning(reason: &'static str, note: impl Into<String>) -> Self {
        Self { warning: true, reason, note: note.into() }
    }
}

/// Publishes `notice` about `object`; a failure is only logged (an Event is
/// worth one try, not a failed reconcile).
pub async fn publish<K>(recorder: &Recorder, object: &K, notice: &Notice)
where
    K: Resource<DynamicType = ()>,
{
    let event = Event {
        type_: if notice.warning { EventType::Warning } else { EventType::Normal },
        reason: notice.reason.into(),
        note: Some(notice.note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &object.object_ref(&())).await {
        tracing::warn!(reason = notice.reason, error = %e, "could not publish an event");
    }
}
