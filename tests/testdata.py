"""Real third-party images for the tests, fetched from package registries into a local cache.

``python tests/testdata.py`` (run by ``make test-data`` and CI) fetches every file below into
``$MEDFM_TEST_DATA`` (default ``.cache/test-data`` in the repository), checking each sha256.
Nothing here is committed: the files keep their packages' licences. Tests ask for a file with
the ``real_file`` fixture, which skips with the command to run when it is missing, unless
``MEDFM_REQUIRE_TEST_DATA=1`` (set by CI) turns the absence into a failure.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("MEDFM_TEST_DATA", REPO / ".cache" / "test-data"))
HEUDICONV = "heudiconv==1.5.1"
ITK_EXAMPLES = "insighttoolkit5-examples"
ITK_DATA = "usr/share/doc/insighttoolkit5-examples/examples/Data"
MRICRON_DATA = "mricron-data"
TOTALSEGMENTATOR = "totalsegmentator==2.18.0"
NILEARN = "nilearn==0.14.1"


@dataclass(frozen=True)
class RealFile:
    """One file inside a wheel (PyPI) or a .deb (Debian), with its sha256 and licence."""

    registry: str  # "pypi" or "debian"
    package: str
    member: str
    sha256: str
    licence: str
    description: str

    @property
    def path(self) -> Path:
        return CACHE / self.package.split("==")[0] / Path(self.member).name


FILES: dict[str, RealFile] = {
    "siemens_mosaic_mr": RealFile(
        "pypi", HEUDICONV, "heudiconv/tests/data/axasc35.dcm",
        "230b7cac146705fc3bce34e77d2fdbf7004d7cbaa782a7bd335191b8bfb0eb45", "Apache-2.0",
        "Siemens mosaic EPI: 35 slices of 64x64 tiled in one 384x384 frame"),
    "enhanced_mr_mixed_orientations": RealFile(
        "pypi", HEUDICONV,
        "heudiconv/tests/data/MRI_102TD_PHA_S.MR.Chen_Matthews_1.3.1.2022.11.16.15.50.20.357.31204541.dcm",
        "32819bfd02b9be68395c6cfcb4bb89694c4d92c0c41ec51040a20d3e24cbcefb", "Apache-2.0",
        "Enhanced MR, 3 resampled frames of 162x162 whose orientations differ"),
    "itk_pd_mha": RealFile(
        "debian", ITK_EXAMPLES, f"{ITK_DATA}/BrainProtonDensity3Slices.mha",
        "d8007e84c4a9e84d93ef9201e59c5c56f155d253e9963b4d4c5092bc3f3a248d", "Apache-2.0",
        "proton-density brain MRI, 181x217x3 MetaImage header"),
    "itk_pd_mha_raw": RealFile(
        "debian", ITK_EXAMPLES, f"{ITK_DATA}/BrainProtonDensity3Slices.raw",
        "0d4b4675aaa5820b446f621ff2094eca590d7a6a37c60ea8ba44a5178ee98925", "Apache-2.0",
        "voxels of the MetaImage header above"),
    "itk_t1_kmeans_segmentation": RealFile(
        "debian", ITK_EXAMPLES, f"{ITK_DATA}/KmeansTest_T1KmeansPrelimSegmentation.nii.gz",
        "8f48a7ced6d27644489b8a2fc8084bf6594560d05f8997ad4327b6353d11f342", "Apache-2.0",
        "7-class k-means segmentation of the ITK head T1 (medfm.samples mr_head_t1)"),
    "itk_pd_slice_png": RealFile(
        "debian", ITK_EXAMPLES, f"{ITK_DATA}/BrainProtonDensitySlice.png",
        "f23b1322c71248617341bb41b312c60c222eb65c5d06df9d1a093b96e45e1db9", "Apache-2.0",
        "axial proton-density brain MRI slice, 181x217 palette PNG"),
    "itk_t1_slice_png": RealFile(
        "debian", ITK_EXAMPLES, f"{ITK_DATA}/BrainT1Slice.png",
        "43f5d1bdb8130c3327dd4496568aed8c4b5ac4229e1a7d04fad412d55fd1ca18", "Apache-2.0",
        "axial T1 brain MRI slice, 181x217, gray stored as RGB PNG"),
    "itk_sagittal_slice_png": RealFile(
        "debian", ITK_EXAMPLES, f"{ITK_DATA}/BrainMidSagittalSlice.png",
        "c22dc08de7101749c840c9cb142643bbb0f24cd3f363cc5c23ad5bbf70c33189", "Apache-2.0",
        "mid-sagittal brain MRI slice, 217x180 8-bit gray PNG"),
    "itk_fat_mri_slice_png": RealFile(
        "debian", ITK_EXAMPLES, f"{ITK_DATA}/FatMRISlice.png",
        "933054fb93c2e6f06451c41bffa58667f42c2b1fa515ca30aa67280b038fa4fd", "Apache-2.0",
        "fat-weighted body MRI slice, 256x256 palette PNG"),
    "colin27_t1": RealFile(
        "debian", MRICRON_DATA, "usr/share/mricron/templates/ch2.nii.gz",
        "a009051127f64dc3dd554d5f5b589870ea72106d9642c21b4e7093e478cfc309", "BSD-3-clause (mricron-data)",
        "Colin27 single-subject T1 brain MRI, 181x217x181 at 1 mm (MNI space)"),
    "colin27_t1_brain": RealFile(
        "debian", MRICRON_DATA, "usr/share/mricron/templates/ch2bet.nii.gz",
        "592a2d20abdf36eefcb540ca8958428040edffc1bc1a18ba1dcfbabac77c5dd1", "BSD-3-clause (mricron-data)",
        "Colin27 T1, skull-stripped (BET), 181x217x181 at 1 mm"),
    "colin27_t1_05mm": RealFile(
        "debian", MRICRON_DATA, "usr/share/mricron/templates/ch2better.nii.gz",
        "a094f3ccf383c495c9569625bd0c06993fd4b02d2a8d9966da5fea7d7e530e8d", "BSD-3-clause (mricron-data)",
        "Colin27 T1 at 0.5 mm, 301x370x316 (same subject as colin27_t1)"),
    "aal_atlas": RealFile(
        "debian", MRICRON_DATA, "usr/share/mricron/templates/aal.nii.gz",
        "b512dcd3f36b77f56be7a9a038134096e66314b7e8c31d25875b96bcf6991454",
        "mricron-data (BSD-3-clause); AAL atlas, Tzourio-Mazoyer et al. 2002, cite when used",
        "AAL label atlas in the Colin27 / MNI space, 181x217x181 at 1 mm, 116 regions"),
    "aal_atlas_names": RealFile(
        "debian", MRICRON_DATA, "usr/share/mricron/templates/aal.nii.txt",
        "1788d6556a9ec056de9867b2382cf1ce1b51b87ae4cfd9cd25de48ae4dde709e", "as aal_atlas",
        "AAL region names: 'index name code' per line"),
    "mni152_2009a_t1": RealFile(
        "pypi", NILEARN, "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
        "BSD-3-clause (nilearn); ICBM 2009a template, McConnell Brain Imaging Centre, use with copyright notice",
        "MNI152 ICBM 2009a symmetric T1 template, brain-masked, 197x233x189 at 1 mm"),
    "ct_brain_template_1mm": RealFile(
        "pypi", TOTALSEGMENTATOR, "totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz",
        "e6964149f62ae88b9973cec43ed80974368a24c922ff8b62d946e7c855eae265", "Apache-2.0",
        "head-CT brain template, 202x202x179 at 1 mm (the 2 mm crop in medfm.samples comes from it)"),
}


def brain_t1_datalist() -> list[dict[str, str]]:
    """Every real T1 brain MRI reachable here, as ``{"image", "subject"}`` items (fetch first).

    Four subjects: Colin27 (whole head, skull-stripped, and 0.5 mm), the MNI152 2009a template,
    the ITK example head T1 (medfm's sample) and nibabel's small anatomical test volume.
    """
    import medfm
    from nibabel.testing import data_path

    return [
        {"image": str(FILES["colin27_t1"].path), "subject": "colin27"},
        {"image": str(FILES["colin27_t1_brain"].path), "subject": "colin27"},
        {"image": str(FILES["colin27_t1_05mm"].path), "subject": "colin27"},
        {"image": str(FILES["mni152_2009a_t1"].path), "subject": "mni152"},
        {"image": medfm.samples.path("mr_head_t1"), "subject": "itk_t1"},
        {"image": str(Path(data_path) / "anatomical.nii"), "subject": "nibabel_anatomical"},
    ]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _download_wheel(package: str, folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                    package, "-d", str(folder)], check=True)
    return next(folder.glob("*.whl"))


def _download_deb(package: str, folder: Path) -> Path:
    def download() -> bool:
        return subprocess.run(["apt-get", "download", package], cwd=folder, capture_output=True).returncode == 0

    if not download():
        # a fresh machine may have no package lists yet; only root can fetch them
        if os.geteuid() != 0:
            raise RuntimeError(f"apt-get download {package} failed and only root can run apt-get update")
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        if not download():
            raise RuntimeError(f"apt-get download {package} failed")
    deb = next(folder.glob("*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), str(folder / "root")], check=True)
    return folder / "root"


def fetch() -> list[str]:
    """Fetch every missing file; return the problems (empty when all are present and verified)."""
    problems = []
    by_package: dict[tuple[str, str], list[RealFile]] = {}
    for item in FILES.values():
        if not (item.path.exists() and sha256(item.path) == item.sha256):
            by_package.setdefault((item.registry, item.package), []).append(item)
    for (registry, package), items in by_package.items():
        with tempfile.TemporaryDirectory(prefix="medfm-test-data-") as scratch:
            try:
                if registry == "pypi":
                    with zipfile.ZipFile(_download_wheel(package, Path(scratch))) as wheel:
                        contents = {item.member: wheel.read(item.member) for item in items}
                else:
                    root = _download_deb(package, Path(scratch))
                    contents = {item.member: (root / item.member).read_bytes() for item in items}
            except (OSError, RuntimeError, KeyError, subprocess.CalledProcessError, StopIteration) as error:
                problems.append(f"{registry} package {package}: {error}")
                continue
            for item in items:
                digest = hashlib.sha256(contents[item.member]).hexdigest()
                if digest != item.sha256:
                    problems.append(f"{item.member} from {package}: sha256 {digest} != expected {item.sha256}")
                    continue
                item.path.parent.mkdir(parents=True, exist_ok=True)
                partial = item.path.with_suffix(item.path.suffix + ".part")
                partial.write_bytes(contents[item.member])
                partial.replace(item.path)
    return problems


def main() -> int:
    problems = fetch()
    for problem in problems:
        print(f"test data: {problem}", file=sys.stderr)
    present = sum(item.path.exists() for item in FILES.values())
    print(f"test data: {present}/{len(FILES)} real files in {CACHE}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
