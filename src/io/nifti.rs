//! NIfTI-1 read and write (`.nii`, `.nii.gz`) with ITK's geometry.
//!
//! Geometry rules (DESIGN.md): NIfTI stores RAS, ITK and this crate LPS, so rows 0 and 1 of the
//! direction and origin change sign on read and write. On read the sform is used when
//! `sform_code > 0`, else the qform when `qform_code > 0` (quaternion, negative qfac), else
//! "method 1" of the NIfTI standard: spacing from pixdim, origin 0, identity in RAS — what
//! nifti1_io and therefore ITK do. On write both sform and qform are set (code 1, scanner), so
//! ITK, nibabel and 3D Slicer read back the same geometry.
//!
//! The header is parsed by the `nifti` crate; the voxel bytes are read here so that a header
//! that lies about its size can never make us allocate more than the file holds: the data is
//! read incrementally up to the size the header claims, and a short file is an error.
use crate::error::{Error, Result};
use crate::volume::{AnyVolume, DType, Geometry, Volume, Voxel};
use ndarray::Array3;
use nifti::{NiftiHeader, NiftiType};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

/// What `read_header` learns without touching the voxels.
#[derive(Clone, Debug)]
pub struct HeaderInfo {
    pub dims: [usize; 3],
    pub dtype: DType,
    pub geometry: Geometry,
    /// `Some((slope, inter))` when the file asks for intensity scaling.
    pub scaling: Option<(f64, f64)>,
    pub header: NiftiHeader,
}

use crate::limits::MAX_VOXELS;

/// Decompressed bytes tolerated after the voxel data of a `.nii.gz` (read to reach and check
/// the gzip trailer); more means the header does not describe the file.
const MAX_TRAILING_BYTES: u64 = 64 << 20;

/// Opens a NIfTI file, transparently decompressing gzip; says whether it is gzip.
fn open(path: &Path) -> Result<(Box<dyn Read>, bool)> {
    let md = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if md.is_dir() {
        return Err(Error::format(path, "is a folder, not a NIfTI file"));
    }
    let mut file = BufReader::new(File::open(path).map_err(|e| Error::io(path, e))?);
    // gzip is detected by its magic bytes, not by the file name.
    let mut magic = [0u8; 2];
    let n = read_full(&mut file, &mut magic).map_err(|e| Error::io(path, e))?;
    let head = std::io::Cursor::new(magic[..n].to_vec());
    let chained = head.chain(file);
    if n == 2 && magic == [0x1f, 0x8b] {
        Ok((Box::new(flate2::read::MultiGzDecoder::new(chained)), true))
    } else {
        Ok((Box::new(chained), false))
    }
}

/// Like read_exact but reports how much was there instead of failing.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn dtype_of(path: &Path, h: &NiftiHeader) -> Result<DType> {
    Ok(match h.datatype {
        2 => DType::U8,
        256 => DType::I8,
        512 => DType::U16,
        4 => DType::I16,
        768 => DType::U32,
        8 => DType::I32,
        16 => DType::F32,
        64 => DType::F64,
        code => {
            let name = match code {
                1 => "binary",
                32 => "complex64",
                128 => "rgb24",
                1024 => "int64",
                1280 => "uint64",
                1536 => "float128",
                1792 => "complex128",
                2048 => "complex256",
                2304 => "rgba32",
                _ => "unknown",
            };
            return Err(Error::format(
                path,
                format!("unsupported NIfTI datatype {code} ({name}); supported: u8, i8, u16, i16, u32, i32, f32, f64"),
            ));
        }
    })
}

fn nifti_code(dtype: DType) -> i16 {
    match dtype {
        DType::U8 => 2,
        DType::I8 => 256,
        DType::U16 => 512,
        DType::I16 => 4,
        DType::U32 => 768,
        DType::I32 => 8,
        DType::F32 => 16,
        DType::F64 => 64,
    }
}

fn parse_header(path: &Path, bytes: &[u8]) -> Result<NiftiHeader> {
    if bytes.len() < 348 {
        return Err(Error::format(path, format!("not a NIfTI file: {} bytes, a NIfTI-1 header needs 348", bytes.len())));
    }
    let sizeof_le = i32::from_le_bytes(bytes[0..4].try_into().unwrap());
    let sizeof_be = i32::from_be_bytes(bytes[0..4].try_into().unwrap());
    if sizeof_le == 540 || sizeof_be == 540 {
        return Err(Error::format(path, "NIfTI-2 files are not supported (NIfTI-1 only)"));
    }
    if sizeof_le != 348 && sizeof_be != 348 {
        return Err(Error::format(path, "not a NIfTI-1 file (sizeof_hdr is not 348)"));
    }
    let magic = &bytes[344..348];
    if magic == b"ni1\0" {
        return Err(Error::format(path, "a .hdr/.img pair is not supported: convert it to a single .nii/.nii.gz"));
    }
    if magic != b"n+1\0" {
        return Err(Error::format(path, "wrong NIfTI magic (expected \"n+1\")"));
    }
    NiftiHeader::from_reader(bytes).map_err(|e| Error::format(path, format!("bad NIfTI header: {e}")))
}

/// Reads and checks the header only.
pub fn read_header(path: impl AsRef<Path>) -> Result<HeaderInfo> {
    let path = path.as_ref();
    let (mut r, _) = open(path)?;
    let mut buf = [0u8; 348];
    let n = read_full(&mut r, &mut buf).map_err(|e| corrupt(path, e))?;
    header_info(path, parse_header(path, &buf[..n])?)
}

fn corrupt(path: &Path, e: std::io::Error) -> Error {
    Error::format(path, format!("corrupt or truncated file: {e}"))
}

fn header_info(path: &Path, h: NiftiHeader) -> Result<HeaderInfo> {
    // dim[] is signed in the standard (the nifti crate reads it unsigned): show what was written.
    let ndim = h.dim[0] as i16;
    if !(1..=7).contains(&ndim) {
        return Err(Error::format(path, format!("invalid dim[0] = {ndim} (must be 1..7)")));
    }
    if let Some(a) = (1..=ndim as usize).find(|&a| (h.dim[a] as i16) < 0) {
        return Err(Error::format(path, format!("invalid dim[{a}] = {} (negative)", h.dim[a] as i16)));
    }
    let ndim = ndim as u16;
    let d = |i: usize| if i <= ndim as usize { h.dim[i] as usize } else { 1 };
    let dims = [d(1), d(2), d(3)];
    if dims.contains(&0) {
        return Err(Error::format(path, format!("a dimension is 0: dims {dims:?}")));
    }
    let extra: Vec<usize> = (4..=ndim as usize).map(d).collect();
    if extra.iter().any(|&e| e != 1) {
        return Err(Error::format(
            path,
            format!("{}D image (dims {:?}): only 3D volumes are supported", ndim, &h.dim[1..=ndim as usize]),
        ));
    }
    let dtype = dtype_of(path, &h)?;
    if (h.bitpix as usize) != dtype.size() * 8 {
        return Err(Error::format(path, format!("bitpix {} does not match datatype {}", h.bitpix, dtype.name())));
    }
    let voxels = dims.iter().product::<usize>();
    if voxels > MAX_VOXELS {
        return Err(Error::format(path, format!("dims {dims:?} are beyond any supported size")));
    }
    let geometry = geometry_from_header(path, &h)?;
    let (slope, inter) = (h.scl_slope as f64, h.scl_inter as f64);
    let scaling = if slope != 0.0 && slope.is_finite() && inter.is_finite() && (slope != 1.0 || inter != 0.0) {
        Some((slope, inter))
    } else {
        None
    };
    Ok(HeaderInfo { dims, dtype, geometry, scaling, header: h })
}

/// Reads a 3D NIfTI-1 volume in its own voxel type (f32, or f64 for f64 files, when the header
/// asks for scl_slope/scl_inter scaling, which is applied).
pub fn read(path: impl AsRef<Path>) -> Result<AnyVolume> {
    let path = path.as_ref();
    let (mut r, gz) = open(path)?;
    let mut hbuf = [0u8; 348];
    let n = read_full(&mut r, &mut hbuf).map_err(|e| corrupt(path, e))?;
    let info = header_info(path, parse_header(path, &hbuf[..n])?)?;
    let h = &info.header;
    let vox_offset = h.vox_offset;
    if !vox_offset.is_finite() || vox_offset < 348.0 || vox_offset > (1u64 << 32) as f32 {
        return Err(Error::format(path, format!("invalid vox_offset {vox_offset}")));
    }
    // Skip the extensions between the header and the voxels.
    let skip = vox_offset as u64 - 348;
    let skipped = std::io::copy(&mut (&mut r).take(skip), &mut std::io::sink()).map_err(|e| corrupt(path, e))?;
    if skipped < skip {
        return Err(Error::format(path, "truncated file: it ends before the voxel data starts"));
    }
    let want = info.dims.iter().product::<usize>() * info.dtype.size();
    // read_to_end grows the buffer as bytes arrive, so a lying header cannot force a huge
    // allocation; `take` stops at what the header claims.
    let mut bytes = Vec::new();
    (&mut r).take(want as u64).read_to_end(&mut bytes).map_err(|e| corrupt(path, e))?;
    if bytes.len() < want {
        return Err(Error::format(
            path,
            format!(
                "truncated file: the header claims {} bytes of voxel data ({:?} {}), the file holds {}",
                want,
                info.dims,
                info.dtype.name(),
                bytes.len()
            ),
        ));
    }
    if gz {
        // The gzip decoder checks the CRC-32 and the length (ISIZE) of the data only when it
        // reaches the end of the stream, and a concatenated member or garbage after it only
        // then too: read on to the end, or a damaged file would be taken as valid.
        let extra = std::io::copy(&mut (&mut r).take(MAX_TRAILING_BYTES + 1), &mut std::io::sink()).map_err(|e| corrupt(path, e))?;
        if extra > MAX_TRAILING_BYTES {
            return Err(Error::format(path, format!("the file holds far more data than its header claims ({:?} {})", info.dims, info.dtype.name())));
        }
    }
    let big = h.endianness == nifti::Endianness::Big;
    let vol = decode(&bytes, &info, big);
    Ok(match info.scaling {
        None => vol,
        Some((slope, inter)) => match vol {
            AnyVolume::F64(v) => AnyVolume::F64(Volume::new(v.data.mapv(|x| x * slope + inter), v.geometry)),
            other => {
                let v = other.cast::<f64>();
                AnyVolume::F32(Volume::new(v.data.mapv(|x| (x * slope + inter) as f32), v.geometry))
            }
        },
    })
}

fn decode(bytes: &[u8], info: &HeaderInfo, big: bool) -> AnyVolume {
    macro_rules! dec {
        ($t:ty, $n:expr) => {{
            let v: Vec<$t> = bytes
                .chunks_exact($n)
                .map(|c| {
                    let a: [u8; $n] = c.try_into().unwrap();
                    if big {
                        <$t>::from_be_bytes(a)
                    } else {
                        <$t>::from_le_bytes(a)
                    }
                })
                .collect();
            let [nx, ny, nz] = info.dims;
            Volume::new(Array3::from_shape_vec((nz, ny, nx), v).expect("length checked"), info.geometry).into()
        }};
    }
    match info.dtype {
        DType::U8 => dec!(u8, 1),
        DType::I8 => dec!(i8, 1),
        DType::U16 => dec!(u16, 2),
        DType::I16 => dec!(i16, 2),
        DType::U32 => dec!(u32, 4),
        DType::I32 => dec!(i32, 4),
        DType::F32 => dec!(f32, 4),
        DType::F64 => dec!(f64, 8),
    }
}

/// Geometry (LPS) from a NIfTI header, by the sform > qform > pixdim rule.
pub fn geometry_from_header(path: &Path, h: &NiftiHeader) -> Result<Geometry> {
    let pix = |i: usize| {
        let p = (h.pixdim[i] as f64).abs();
        if p > 0.0 && p.is_finite() {
            p
        } else {
            1.0
        }
    };
    let (ras_m, ras_o) = if h.sform_code > 0 {
        let rows = [h.srow_x, h.srow_y, h.srow_z];
        let mut m = [0.0; 9];
        for r in 0..3 {
            for c in 0..3 {
                m[3 * r + c] = rows[r][c] as f64;
            }
        }
        (m, [rows[0][3] as f64, rows[1][3] as f64, rows[2][3] as f64])
    } else if h.qform_code > 0 {
        let r = quatern_to_rotation(h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64);
        let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let s = [pix(1), pix(2), pix(3) * qfac];
        let mut m = [0.0; 9];
        for row in 0..3 {
            for c in 0..3 {
                m[3 * row + c] = r[3 * row + c] * s[c];
            }
        }
        (m, [h.quatern_x as f64, h.quatern_y as f64, h.quatern_z as f64])
    } else {
        ([pix(1), 0.0, 0.0, 0.0, pix(2), 0.0, 0.0, 0.0, pix(3)], [0.0; 3])
    };
    let mut spacing = [0.0; 3];
    let mut direction = [0.0; 9];
    for c in 0..3 {
        let norm = (0..3).map(|r| ras_m[3 * r + c].powi(2)).sum::<f64>().sqrt();
        if !(norm > 0.0 && norm.is_finite()) {
            return Err(Error::format(path, format!("degenerate affine: voxel axis {c} has zero length")));
        }
        spacing[c] = norm;
        for r in 0..3 {
            let flip = if r < 2 { -1.0 } else { 1.0 }; // RAS -> LPS
            direction[3 * r + c] = flip * ras_m[3 * r + c] / norm;
        }
    }
    let origin = [-ras_o[0], -ras_o[1], ras_o[2]];
    let g = Geometry { origin, spacing, direction };
    g.validate().map_err(|e| Error::format(path, format!("{e} (sheared affines are not supported)")))?;
    Ok(g)
}

/// NIfTI's quaternion (b, c, d; a recovered) to a row-major rotation matrix.
fn quatern_to_rotation(b: f64, c: f64, d: f64) -> [f64; 9] {
    let mut a = 1.0 - (b * b + c * c + d * d);
    let (mut b, mut c, mut d) = (b, c, d);
    if a < 1e-7 {
        // nifti1_io: the quaternion is not unit; normalise (b,c,d) and take a = 0
        let n = (b * b + c * c + d * d).sqrt();
        b /= n;
        c /= n;
        d /= n;
        a = 0.0;
    } else {
        a = a.sqrt();
    }
    [
        a * a + b * b - c * c - d * d,
        2.0 * (b * c - a * d),
        2.0 * (b * d + a * c),
        2.0 * (b * c + a * d),
        a * a + c * c - b * b - d * d,
        2.0 * (c * d - a * b),
        2.0 * (b * d - a * c),
        2.0 * (c * d + a * b),
        a * a + d * d - c * c - b * b,
    ]
}

/// Rotation (proper, det +1) to NIfTI's (b, c, d), as nifti_mat44_to_quatern does.
fn rotation_to_quatern(r: &[f64; 9]) -> (f64, f64, f64) {
    let (r11, r12, r13, r21, r22, r23, r31, r32, r33) = (r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8]);
    let trace = r11 + r22 + r33 + 1.0;
    let (a, b, c, d) = if trace > 0.5 {
        let a = 0.5 * trace.sqrt();
        (a, 0.25 * (r32 - r23) / a, 0.25 * (r13 - r31) / a, 0.25 * (r21 - r12) / a)
    } else {
        let xd = 1.0 + r11 - (r22 + r33);
        let yd = 1.0 + r22 - (r11 + r33);
        let zd = 1.0 + r33 - (r11 + r22);
        if xd > 1.0 {
            let b = 0.5 * xd.sqrt();
            (0.25 * (r32 - r23) / b, b, 0.25 * (r12 + r21) / b, 0.25 * (r13 + r31) / b)
        } else if yd > 1.0 {
            let c = 0.5 * yd.sqrt();
            (0.25 * (r13 - r31) / c, 0.25 * (r12 + r21) / c, c, 0.25 * (r23 + r32) / c)
        } else {
            let d = 0.5 * zd.sqrt();
            (0.25 * (r21 - r12) / d, 0.25 * (r13 + r31) / d, 0.25 * (r23 + r32) / d, d)
        }
    };
    // NIfTI stores a >= 0 implicitly: flip the sign of the whole quaternion if needed.
    if a < 0.0 {
        (-b, -c, -d)
    } else {
        (b, c, d)
    }
}

/// The header we write for a volume of `dims`/`dtype` with `geometry`: sform and qform both set
/// (code 1, scanner anatomical), millimetres, no scaling.
pub fn header_for(dims: [usize; 3], dtype: DType, geometry: &Geometry) -> Result<NiftiHeader> {
    geometry.validate()?;
    if dims.iter().any(|&d| d == 0 || d > i16::MAX as usize) {
        return Err(Error::invalid(format!("dims {dims:?} cannot be written as NIfTI-1 (1..32767 per axis)")));
    }
    let g = geometry;
    // LPS -> RAS: rows 0 and 1 change sign.
    let flip = [-1.0, -1.0, 1.0];
    let mut dir_ras = [0.0; 9];
    for r in 0..3 {
        for c in 0..3 {
            dir_ras[3 * r + c] = flip[r] * g.direction[3 * r + c];
        }
    }
    let o = [flip[0] * g.origin[0], flip[1] * g.origin[1], g.origin[2]];
    let mut h = NiftiHeader::default();
    h.dim = [3, dims[0] as u16, dims[1] as u16, dims[2] as u16, 1, 1, 1, 1];
    h.datatype = nifti_code(dtype);
    h.bitpix = (dtype.size() * 8) as i16;
    h.xyzt_units = 2 | 8; // mm, seconds (what ITK writes)
    h.scl_slope = 1.0;
    h.scl_inter = 0.0;
    h.sform_code = 1;
    h.qform_code = 1;
    let rows = [&mut h.srow_x, &mut h.srow_y, &mut h.srow_z];
    for (r, row) in rows.into_iter().enumerate() {
        for c in 0..3 {
            row[c] = (dir_ras[3 * r + c] * g.spacing[c]) as f32;
        }
        row[3] = o[r] as f32;
    }
    // qform: a proper rotation; a left-handed direction is expressed with qfac = -1.
    let det = dir_ras[0] * (dir_ras[4] * dir_ras[8] - dir_ras[5] * dir_ras[7]) - dir_ras[1] * (dir_ras[3] * dir_ras[8] - dir_ras[5] * dir_ras[6])
        + dir_ras[2] * (dir_ras[3] * dir_ras[7] - dir_ras[4] * dir_ras[6]);
    let qfac = if det < 0.0 { -1.0 } else { 1.0 };
    let mut rot = dir_ras;
    for r in 0..3 {
        rot[3 * r + 2] *= qfac;
    }
    let (b, c, d) = rotation_to_quatern(&rot);
    h.quatern_b = b as f32;
    h.quatern_c = c as f32;
    h.quatern_d = d as f32;
    h.quatern_x = o[0] as f32;
    h.quatern_y = o[1] as f32;
    h.quatern_z = o[2] as f32;
    h.pixdim = [qfac as f32, g.spacing[0] as f32, g.spacing[1] as f32, g.spacing[2] as f32, 1.0, 1.0, 1.0, 1.0];
    h.magic = *b"n+1\0";
    h.vox_offset = 352.0;
    Ok(h)
}

fn is_gz(path: &Path) -> bool {
    path.to_string_lossy().to_ascii_lowercase().ends_with(".gz")
}

/// A NIfTI output must be named `*.nii` or `*.nii.gz` (callers check it before long work).
pub fn check_output_name(path: &Path) -> Result<()> {
    let name = path.to_string_lossy().to_ascii_lowercase();
    if !(name.ends_with(".nii") || name.ends_with(".nii.gz")) {
        return Err(Error::format(path, "output must end in .nii or .nii.gz"));
    }
    Ok(())
}

/// Writes a volume as NIfTI-1 (gzip when the name ends in `.gz`). The file appears only when
/// complete: it is written to a hidden sibling and renamed.
pub fn write<T: Voxel + bytemuck::Pod>(path: impl AsRef<Path>, vol: &Volume<T>) -> Result<()> {
    let path = path.as_ref();
    check_output_name(path)?;
    let header = header_for(vol.dims(), T::DTYPE, &vol.geometry).map_err(|e| Error::format(path, e.to_string()))?;
    let tmp = crate::io::temp_sibling(path, if is_gz(path) { ".nii.gz" } else { ".nii" });
    let dtype = match T::DTYPE {
        DType::U8 => NiftiType::Uint8,
        DType::I8 => NiftiType::Int8,
        DType::U16 => NiftiType::Uint16,
        DType::I16 => NiftiType::Int16,
        DType::U32 => NiftiType::Uint32,
        DType::I32 => NiftiType::Int32,
        DType::F32 => NiftiType::Float32,
        DType::F64 => NiftiType::Float64,
    };
    // nifti's writer takes [i, j, k] arrays and writes them in Fortran order: our [k, j, i]
    // C-order array with reversed axes is exactly that, without a copy.
    let result = nifti::writer::WriterOptions::new(&tmp)
        .reference_header(&header)
        .compress(is_gz(path))
        .write_nifti_with_type(&vol.data.view().reversed_axes(), dtype)
        .map_err(|e| Error::format(path, format!("cannot write NIfTI: {e}")))
        .and_then(|_| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes any volume in its own voxel type.
pub fn write_any(path: impl AsRef<Path>, vol: &AnyVolume) -> Result<()> {
    crate::with_volume!(vol, v => write(path, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oblique() -> Geometry {
        // A rotation of 30° about an oblique axis, anisotropic spacing, left-handed last axis.
        let (s, c) = (0.5f64, 0.75f64.sqrt());
        let rz = [c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0];
        let rx = [1.0, 0.0, 0.0, 0.0, c, -s, 0.0, s, c];
        let mut m = [0.0; 9];
        for r in 0..3 {
            for k in 0..3 {
                m[3 * r + k] = (0..3).map(|j| rz[3 * r + j] * rx[3 * j + k]).sum();
            }
        }
        for r in 0..3 {
            m[3 * r + 2] = -m[3 * r + 2];
        }
        Geometry { origin: [12.5, -30.25, 7.0], spacing: [0.7, 0.9, 2.5], direction: m }
    }

    #[test]
    fn quaternion_round_trip() {
        let g = oblique();
        let h = header_for([4, 5, 6], DType::F32, &g).unwrap();
        let mut q = h.clone();
        q.sform_code = 0; // force the qform path
        let back = geometry_from_header(Path::new("x"), &q).unwrap();
        assert!(back.max_abs_diff(&g) < 1e-5, "{back:?} vs {g:?}");
        let back = geometry_from_header(Path::new("x"), &h).unwrap();
        assert!(back.max_abs_diff(&g) < 1e-5);
    }

    #[test]
    fn write_read_round_trip_all_dtypes() {
        let dir = tempfile::tempdir().unwrap();
        let g = oblique();
        macro_rules! rt {
            ($t:ty, $ext:expr) => {{
                let data = Array3::from_shape_fn((3, 4, 5), |(k, j, i)| <$t>::from_f64((i + 5 * j + 20 * k) as f64 - 7.0));
                let v = Volume::new(data, g);
                let p = dir.path().join(format!("v_{}.{}", stringify!($t), $ext));
                write(&p, &v).unwrap();
                let back = read(&p).unwrap();
                assert_eq!(back.dtype(), <$t as Voxel>::DTYPE);
                let b: Volume<$t> = back.cast();
                assert_eq!(b.data, v.data);
                assert!(b.geometry.max_abs_diff(&g) < 1e-5);
            }};
        }
        rt!(u8, "nii.gz");
        rt!(i8, "nii");
        rt!(u16, "nii.gz");
        rt!(i16, "nii");
        rt!(u32, "nii.gz");
        rt!(i32, "nii");
        rt!(f32, "nii.gz");
        rt!(f64, "nii");
        // no temporary files are left behind
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with('.')).collect();
        assert!(left.is_empty());
    }
}
