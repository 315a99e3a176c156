//! Segment Anything (SAM) in tch.
