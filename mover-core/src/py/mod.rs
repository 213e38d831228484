//! The Python binding, `pyapp._mover`: plain data in, frozen reports out.
//!
//! Services never import this module; they use the typed facade `pyapp.mover`.

use pyo3::prelude::*;

mod errors;

#[pymodule]
fn _mover(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
