//! The exception hierarchy: one Python class per [`CoreError`] variant, all rooted at
//! `MoverError`, with the range and the server's error code as attributes.

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

use crate::error::MoverError as CoreError;

create_exception!(
    pyapp._mover,
    MoverError,
    PyException,
    "Base of every error raised by the mover."
);
create_exception!(
    pyapp._mover,
    InvalidEndpointError,
    MoverError,
    "An endpoint URI or path that cannot be understood."
);
create_exception!(
    pyapp._mover,
    ConnectError,
    MoverError,
    "An endpoint could not be reached or opened."
);
create_exception!(
    pyapp._mover,
    ProtocolError,
    MoverError,
    "The NBD peer broke the protocol or refused a needed option."
);
create_exception!(
    pyapp._mover,
    SourceReadError,
    MoverError,
    "Reading the source failed."
);
create_exception!(
    pyapp._mover,
    TargetWriteError,
    MoverError,
    "Writing the target failed."
);
create_exception!(
    pyapp._mover,
    InvalidPlanError,
    MoverError,
    "The extent plan does not fit the disk."
);
create_exception!(
    pyapp._mover,
    FormatError,
    MoverError,
    "An image is corrupt or not of the expected format."
);
create_exception!(
    pyapp._mover,
    CancelledError,
    MoverError,
    "The operation was cancelled."
);

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("MoverError", py.get_type::<MoverError>())?;
    m.add(
        "InvalidEndpointError",
        py.get_type::<InvalidEndpointError>(),
    )?;
    m.add("ConnectError", py.get_type::<ConnectError>())?;
    m.add("ProtocolError", py.get_type::<ProtocolError>())?;
    m.add("SourceReadError", py.get_type::<SourceReadError>())?;
    m.add("TargetWriteError", py.get_type::<TargetWriteError>())?;
    m.add("InvalidPlanError", py.get_type::<InvalidPlanError>())?;
    m.add("FormatError", py.get_type::<FormatError>())?;
    m.add("CancelledError", py.get_type::<CancelledError>())?;
    Ok(())
}

impl From<CoreError> for PyErr {
    fn from(err: CoreError) -> PyErr {
        let message = err.to_string();
        let (pyerr, range) = match &err {
            CoreError::InvalidEndpoint { .. } => (InvalidEndpointError::new_err(message), None),
            CoreError::Connect { .. } => (ConnectError::new_err(message), None),
            CoreError::Protocol { .. } => (ProtocolError::new_err(message), None),
            CoreError::SourceRead {
                offset,
                length,
                code,
                ..
            } => (
                SourceReadError::new_err(message),
                Some((*offset, *length, *code)),
            ),
            CoreError::TargetWrite {
                offset,
                length,
                code,
                ..
            } => (
                TargetWriteError::new_err(message),
                Some((*offset, *length, *code)),
            ),
            CoreError::InvalidPlan(_) => (InvalidPlanError::new_err(message), None),
            CoreError::Format { .. } => (FormatError::new_err(message), None),
            CoreError::Cancelled => (CancelledError::new_err(message), None),
            CoreError::Io { .. } => (MoverError::new_err(message), None),
        };
        Python::attach(|py| {
            let value = pyerr.value(py);
            let (offset, length, code) = match range {
                Some((o, l, c)) => (Some(o), Some(l), c),
                None => (None, None, None),
            };
            // Attributes every MoverError carries; setting them cannot fail on a fresh instance.
            let _ = value.setattr("offset", offset);
            let _ = value.setattr("length", length);
            let _ = value.setattr("code", code);
        });
        pyerr
    }
}
