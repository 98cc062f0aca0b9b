//! Participant SDK (work in progress).
