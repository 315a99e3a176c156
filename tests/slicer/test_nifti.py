"""The worker mode's small NIfTI writer/reader, checked against nibabel."""
import nibabel as nib
import numpy as np
import pytest

from conftest import oblique_matrix
from SFRSegmentationLib import nifti


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.uint16, np.float64, np.int64])
@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_written_files_read_back_in_nibabel(tmp_path, dtype, name):
    m = oblique_matrix()
    a = (np.arange(3 * 4 * 5).reshape(3, 4, 5) % 50).astype(dtype)
    nifti.write(tmp_path / name, a, m)
    img = nib.load(str(tmp_path / name))
    assert np.allclose(img.affine, m, atol=1e-5)
    # nibabel indexes [i, j, k]; Slicer arrays are [k, j, i].
    assert np.array_equal(np.asarray(img.dataobj).transpose(2, 1, 0), a)
    back, bm = nifti.read(tmp_path / name)
    assert np.array_equal(back, a) and back.shape == a.shape
    assert np.allclose(bm, m, atol=1e-5)


def test_reads_qform_only_files_with_negative_qfac(tmp_path):
    m = oblique_matrix()
    m[:3, 2] *= -1  # left-handed: NIfTI stores it with qfac = -1
    img = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(5, 4, 3), m)
    img.set_sform(None, code=0)
    img.set_qform(m, code=1)
    nib.save(img, str(tmp_path / "q.nii.gz"))
    a, back = nifti.read(tmp_path / "q.nii.gz")
    assert np.allclose(back, m, atol=1e-4)
    assert a.shape == (3, 4, 5)


def test_refuses_non_nifti(tmp_path):
    (tmp_path / "x.nii").write_bytes(b"not a nifti file at all" * 20)
    with pytest.raises(ValueError, match="x.nii"):
        nifti.read(tmp_path / "x.nii")


def test_gzip_read_in_chunks_and_multi_member_files(tmp_path, monkeypatch):
    import gzip

    monkeypatch.setattr(nifti, "_CHUNK", 1000)  # many chunks, for both the writer and the reader
    m = oblique_matrix()
    a = (np.arange(7 * 9 * 11).reshape(7, 9, 11) % 300).astype(np.int16)
    nifti.write(tmp_path / "v.nii.gz", a, m)
    back, _ = nifti.read(tmp_path / "v.nii.gz")
    assert np.array_equal(back, a)
    # Two gzip members: the trailer's size is only the last member's; the plain read is used.
    nifti.write(tmp_path / "v.nii", a, m)
    data = (tmp_path / "v.nii").read_bytes()
    (tmp_path / "m.nii.gz").write_bytes(gzip.compress(data[:500]) + gzip.compress(data[500:]))
    back, bm = nifti.read(tmp_path / "m.nii.gz")
    assert np.array_equal(back, a) and np.allclose(bm, m, atol=1e-5)
