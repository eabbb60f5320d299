//! The tidepool CLI
