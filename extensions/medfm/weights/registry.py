"""One record per set of weights: where it comes from, how to verify it, what it may be used for.

The CLI, the importer and the bundles' docs all read these records, torchvision-style, so the
facts (URL, hash, licence, preprocessing, training data) are written down once.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType

from ..errors import WeightsError

__all__ = ["Metric", "WeightsEntry", "REGISTRY", "get", "for_bundle", "default_for_bundle", "match_sha256"]

#: SPDX identifiers of the licences under which weights may ship in a bundle.
OPEN_LICENSES = frozenset({"Apache-2.0", "MIT", "BSD-3-Clause", "CC-BY-4.0"})


@dataclass(frozen=True)
class Metric:
    """One reported result: ``value`` (in ``unit``) of these weights on ``task``, and the same measure of
    the baselines reported beside it (``{"from scratch": 94.3}``)."""

    task: str
    value: float
    unit: str = ""
    baselines: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        against = "; ".join(f"{name}: {value:g}{self.unit}" for name, value in self.baselines.items())
        return f"{self.value:g}{self.unit}" + (f" ({against})" if against else "")


@dataclass(frozen=True)
class WeightsEntry:
    """Facts about one checkpoint.

    ``sha256`` is the full hex digest, or a prefix (at least 8 characters) where only a prefix is
    published, or None where none is published (then the entry cannot be downloaded: a download
    must be verifiable; a local copy is imported and its digest recorded). ``network_module`` is the
    ``medfm.networks`` module whose ``checkpoint_filter_fn`` turns this checkpoint into the bundle
    network's state dict, and ``num_params`` that network's parameter count. ``license_spdx`` is the
    licence's SPDX identifier (``LicenseRef-...`` for a custom one) or None where the authors published
    none (all rights reserved); ``license`` says it in words. Each bundle has one ``default`` entry:
    the weights its docs and ``medfm weights fetch`` mean when no name is given. ``demo`` weights only
    show that the workflows run: outputs made with them say so.
    """

    name: str
    bundle: str
    title: str
    file_name: str
    sha256: str | None
    size: int | None
    url: str | None
    license_spdx: str | None
    license: str
    commercial_use: bool
    redistributable: bool
    source: str
    paper: str
    trained_on: str
    preprocessing: str
    network_module: str
    num_params: int
    default: bool = False
    demo: bool = False
    metrics: tuple[Metric, ...] = ()
    notes: str = ""

    def __post_init__(self) -> None:
        if self.sha256 is None:
            if self.url:
                raise ValueError(f"{self.name}: a downloadable entry needs a sha256 to verify the download")
        elif len(self.sha256) < 8 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ValueError(f"{self.name}: sha256 must be lower-case hex, at least 8 characters")
        if self.redistributable and self.license_spdx not in OPEN_LICENSES:
            raise ValueError(f"{self.name}: only weights under an open licence ({', '.join(sorted(OPEN_LICENSES))}) "
                             f"may ship in a bundle, not {self.license_spdx}")

    @property
    def availability(self) -> str:
        """How a user gets these weights: ``download``, ``ships with the bundle`` or ``import your copy``."""
        return "download" if self.url else "ships with the bundle" if self.redistributable else "import your copy"

    def how_to_get(self) -> str:
        """The one instruction that installs these weights into their bundle."""
        if self.url:
            return f"run 'medfm weights fetch {self.bundle}{'' if self.default else f' --weights {self.name}'}'"
        if self.redistributable:
            return f"they ship with the bundle as models/{self.file_name}"
        return f"download {self.file_name} yourself ({self.source}) and run 'medfm weights import {self.bundle} {self.file_name}'"

    def matches(self, digest: str) -> bool:
        """True when ``digest`` (full sha256 hex) is this entry's hash (or starts with its prefix)."""
        return self.sha256 is not None and digest.lower().startswith(self.sha256)

    def network_code(self) -> ModuleType:
        """The module holding the network and its ``checkpoint_filter_fn``."""
        return importlib.import_module(self.network_module)


#: Parameter counts of the bundle networks the weights load into (tested against the networks).
GENESIS_PARAMS = 19_073_665
VDT_PARAMS = 33_160_000
MEDICAL_TRANSFORMER_PARAMS = 988_816
SPAD_VIT_B_PARAMS = 88_639_488

REGISTRY: dict[str, WeightsEntry] = {
    entry.name: entry
    for entry in (
        WeightsEntry(
            name="genesis_chest_ct",
            bundle="models_genesis_chest_ct",
            title="Models Genesis, official PyTorch weights (Genesis_Chest_CT.pt)",
            file_name="Genesis_Chest_CT.pt",
            sha256="62de21a05236d6a8d8d5b03ec740f6ac6b818d15d3e86eed4f38a2a17d63cc08",
            size=152_639_120,
            url="https://huggingface.co/MrGiovanni/ModelsGenesis/resolve/main/Genesis_Chest_CT.pt",
            license_spdx="LicenseRef-ASU-Models-Genesis",
            license="ASU licence for Models Genesis: non-commercial research use only, patent pending "
            "(the Hugging Face page says apache-2.0; the repository's stricter licence applies)",
            commercial_use=False,
            redistributable=False,
            source="https://github.com/MrGiovanni/ModelsGenesis",
            paper="Zhou et al., Models Genesis: Generic Autodidactic Models for 3D Medical Image Analysis, "
            "MICCAI 2019; Medical Image Analysis 67 (2021) 101840",
            trained_on="LUNA16 chest CT, subsets 0-4 (subsets 5-6 for validation); self-supervised "
            "restoration of corrupted 64x64x32 cubes",
            preprocessing="CT: HU clipped to [-1000, 1000] and scaled to [0, 1]; native spacing (no "
            "resampling); 64x64x32 cubes in (x, y, z) order. MRI: per-image min-max to [0, 1].",
            network_module="medfm.networks.genesis_unet3d",
            num_params=GENESIS_PARAMS,
            default=True,
            metrics=(
                Metric("lung nodule false-positive reduction, AUC", 98.2, "%", {"from scratch": 94.3}),
                Metric("lung nodule segmentation, IoU", 77.6, "%", {"from scratch": 74.1}),
                Metric("pulmonary embolism false-positive reduction, AUC", 88, "%", {"from scratch": 80}),
                Metric("BraTS brain tumour segmentation, IoU", 90.6, "%", {"from scratch": 90.2}),
            ),
            notes="Read off the authors' figure, approximate. Saved from nn.DataParallel with optimizer "
            "state ({'epoch', 'state_dict', 'optimizer_state_dict'}), probably PyTorch 1.3 legacy format.",
        ),
        WeightsEntry(
            name="medfm_genesis_demo",
            bundle="models_genesis_chest_ct",
            title="medfm demo pre-training of the Genesis U-Net (ships in the bundle)",
            file_name="model.pt",
            sha256="69165de1823b1dea6bd3526450e55a4d3ef4090cc5b18b3e542a302d7fb86f53",
            size=38_190_459,
            url=None,
            license_spdx="Apache-2.0",
            license="Apache-2.0 (code, training data and these weights)",
            commercial_use=True,
            redistributable=True,
            source="bundles/models_genesis_chest_ct/configs/pretrain.json of this repository",
            paper="this project's own run of the Models Genesis pretext; see the bundle's docs/README.md",
            trained_on="one head-CT brain template (TotalSegmentator ct_brain_atlas_1mm, Apache-2.0), "
            "300 steps of 2 corrupted 64x64x32 crops on 2 CPU cores (62 minutes)",
            preprocessing="same as the official weights",
            network_module="medfm.networks.genesis_unet3d",
            num_params=GENESIS_PARAMS,
            demo=True,
            notes="A demonstration that the pre-training runs end to end and that the quick start works "
            "offline; far weaker than the official weights.",
        ),
        WeightsEntry(
            name="universal_model",
            bundle="universal_model_sar",
            title="Universal Model (Zhang et al. 2020), official weights (Universal_model.pt)",
            file_name="Universal_model.pt",
            sha256="bc7960eb31af5883468efb35b776993fe664250f98eca84244d4921dc3f7e3a5",
            size=152_640_882,
            url="https://media.githubusercontent.com/media/xm-cmic/Universal-Model/master/Universal_model.pt",
            license_spdx=None,
            license="none published: the authors' repository has no licence file, so all rights are reserved; "
            "downloaded on request for research, never redistributed",
            commercial_use=False,
            redistributable=False,
            source="https://github.com/xm-cmic/Universal-Model (git-LFS object; mirror CV-IP/Universal-Model)",
            paper="Zhang X, Zhang S, Zhang C, Wang Y. Universal Model for 3D Medical Image Analysis, arXiv "
            "2010.06107 v1 (2020); v2: SAR: Scale-Aware Restoration Learning for 3D Tumor Segmentation, MICCAI 2021",
            trained_on="several unlabelled CT and MRI datasets of different body regions (exact list unpublished); "
            "self-restoration + scale classification + modality-invariant adversarial learning",
            preprocessing="as Models Genesis (the README loads it exactly like Genesis_Chest_CT.pt): CT HU "
            "[-1000, 1000] to [0, 1], MRI per-image min-max to [0, 1]; 64x64x32 cubes",
            network_module="medfm.networks.genesis_unet3d",
            num_params=GENESIS_PARAMS,
            default=True,
            notes="The same 106 U-Net tensors as Models Genesis, saved from nn.DataParallel under "
            "'state_dict'; the pre-training heads are not in the file. The media URL assumes the "
            "repository's default branch 'master' (the mirror's); the sha256 pins the file either way.",
        ),
        WeightsEntry(
            name="vdt_resnet3d18_imagenet",
            bundle="vdt_resnet3d18",
            title="VDT supervised 3D pre-training, 3D ResNet-18 on ImageNet (res3d18_imagenet_BN_73.07-5ff2ecb7.pth)",
            file_name="res3d18_imagenet_BN_73.07-5ff2ecb7.pth",
            sha256="5ff2ecb7",
            size=None,
            url=None,
            license_spdx=None,
            license="not stated for the weights (the CSPR code is Apache-2.0); trained on ImageNet, whose terms "
            "allow non-commercial research only; imported from your own download, never redistributed",
            commercial_use=False,
            redistributable=False,
            source="https://github.com/urmagicsmine/CSPR (README links: Google Drive file id "
            "1TlaGFA154RfunoLFzvP8SRjzVL8zGTOI, and Baidu Pan); no stable direct URL, so import only",
            paper="Zhang J, Li Y, Zhou Z, Ma K, Yu Y. Advancing 3D Medical Image Analysis with Variable Dimension "
            "Transform based Supervised 3D Pre-training. Neurocomputing 529 (2023); arXiv 2201.01426",
            trained_on="ImageNet-1k training set (1.28 M images, 1000 classes), each RGB image read as a one-channel "
            "3-slice volume with shuffled slice order; RandomResizedCrop 224, flip, label smoothing 0.1, SGD lr 0.1 "
            "cosine, 100 epochs; strides (1, 2, 2) throughout",
            preprocessing="pre-training: 0-255 images normalised with mean 114.495, std 57.63 (all slices). "
            "Fine-tuning in this bundle: CT HU [-1000, 1000] or MRI min-max to [0, 1], times 255, same normalisation",
            network_module="medfm.networks.vdt_resnet3d",
            num_params=VDT_PARAMS,
            default=True,
            metrics=(
                Metric("ImageNet-1k top-1 of the 3D network, read from the file name", 73.07, "%"),
                Metric("annotation saving against training from scratch, at most, as the paper claims", 60, "%"),
            ),
            notes="Only the first 8 hex digits of the sha256 are published (in the file name, as mmcls' "
            "publish tool writes them). Layout expected from mmcls: {'meta', 'state_dict'}; keys may carry "
            "'backbone.' and a 'head.fc' classifier (both handled by checkpoint_filter_fn). A file whose meta "
            "pickles foreign objects imports with --strip_objects.",
        ),
        WeightsEntry(
            name="medfm_medical_transformer_brain_t1",
            bundle="medical_transformer_brain_mri",
            title="medfm pre-training of the Medical Transformer on public T1 brain MRI (ships in the bundle)",
            file_name="model.pt",
            sha256="dd5dcae067f1d6b1729902d9fd13c2f1e1d0278551ba227c41511605fb40ca8e",
            size=3_999_669,
            url=None,
            license_spdx="Apache-2.0",
            license="Apache-2.0 (weights and code); the training images keep their own licences (BSD-3-clause, "
            "Apache-2.0, MIT) and are not included",
            commercial_use=True,
            redistributable=True,
            source="bundles/medical_transformer_brain_mri/configs/pretrain.json of this repository (stage 1, then 2)",
            paper="this project's own run of the Medical Transformer pretext (Jun et al., arXiv 2104.13633, which "
            "published no weights); see the bundle's docs/README.md model card",
            trained_on="6 public T1 volumes of 4 subjects (Colin27 x3, MNI152 2009a, ITK example T1, nibabel "
            "anatomical.nii) under strong spatial and intensity augmentation: triplet loss on the encoder "
            "(200 steps), then masked encoding-vector prediction with the encoder frozen (2,000 steps); trained for "
            "the network of bundle 0.2.0 (the authors' pooling window, position table and norm)",
            preprocessing="RAS, 1 mm, centre pad/crop to the MNI152 grid 193x229x193, min-max to [0, 1], "
            "2x2x2 average pooling to 96x114x96; inputs should be MNI-registered and skull-stripped",
            network_module="medfm.networks.medical_transformer",
            num_params=MEDICAL_TRANSFORMER_PARAMS,
            default=True,
            metrics=(
                Metric("held-out masked-slice MSE", 0.290, "", {"mean embedding": 0.571, "neighbour-slice interpolation": 0.030}),
                Metric("share of augmented volumes whose nearest neighbour is the same subject (24 volumes, 4 subjects)",
                       0.917, "", {"random init": 0.875}),
            ),
            notes="The only downloadable pretrained Medical Transformer, and a small one: 4 brains cannot teach "
            "population anatomy. Held-out numbers come from benchmarks/medical_transformer_pretext.py.",
        ),
        WeightsEntry(
            name="pumit_b_v1",
            bundle="spad_vit_base",
            title="PUMIT SPAD-ViT-B, the authors' release v1 (pumit-b.ckpt, MIM pre-training)",
            file_name="pumit-b.ckpt",
            sha256=None,
            size=None,
            url=None,
            license_spdx=None,
            license="none published: the authors' repository has no licence file, so all rights are reserved; "
            "imported from your own download for research, never redistributed",
            commercial_use=False,
            redistributable=False,
            source="https://github.com/function2-llx/PUMIT/releases/tag/v1 (the README loads ./pre-trained/pumit.ckpt, "
            "the downstream scripts pre-trained/pumit-b.ckpt; asset names, sizes and hashes are not published in text)",
            paper="Luo et al. Building Universal Foundation Models for Medical Image Analysis with Spatially Adaptive "
            "Networks. arXiv 2312.07630 (2023)",
            trained_on="55 public medical imaging datasets (CT, MRI, X-ray, fundus, ultrasound; about 9 M 2D slices "
            "equivalent), 2D and 3D at native spacing; masked image modelling (55% of tokens) with the soft codes of "
            "a frozen SPAD-VT tokenizer as targets; initialised from EVA-02-B; AdamW 2e-5, 300k steps",
            preprocessing="pre-training: through-plane axis first, foreground crop, shorter in-plane side at most 512, "
            "0.5-99.5 percentile to [0, 1], gray repeated to RGB, ImageNet mean / std. This bundle: RAS, percentile "
            "to [0, 1], one channel (the RGB patch kernel summed), spacing-aware resampling to whole tokens",
            network_module="medfm.networks.spad_vit",
            num_params=SPAD_VIT_B_PARAMS,
            default=True,
            notes="A PyTorch-Lightning checkpoint: weights under 'state_dict' (no 'model.' prefix, maybe 'module.'), "
            "tokenizer removed, 'mask_token' and 'mim_head.*' present, possibly optimizer state. A file that pickles "
            "Lightning objects imports with --strip_objects (never unpickled). Its sha256 is recorded at import in "
            "models/weights.json; the paper's result tables were not verified here.",
        ),
    )
}


def get(name: str) -> WeightsEntry:
    """The entry called ``name``; raises :class:`WeightsError` listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise WeightsError(f"unknown weights {name!r}; known: {', '.join(REGISTRY)}") from None


def for_bundle(bundle: str) -> list[WeightsEntry]:
    """All entries for ``bundle``, downloadable ones first."""
    entries = [e for e in REGISTRY.values() if e.bundle == bundle]
    return sorted(entries, key=lambda e: e.url is None)


def default_for_bundle(bundle: str) -> WeightsEntry:
    """The weights ``bundle``'s docs and ``medfm weights fetch`` mean when no name is given."""
    try:
        return next(e for e in REGISTRY.values() if e.bundle == bundle and e.default)
    except StopIteration:
        raise WeightsError(f"no weights registered for bundle {bundle!r}") from None


def match_sha256(digest: str) -> WeightsEntry | None:
    """The registered entry whose hash is ``digest``, if any."""
    return next((e for e in REGISTRY.values() if e.matches(digest)), None)


def _check_one_default_per_bundle() -> None:
    for bundle in {e.bundle for e in REGISTRY.values()}:
        defaults = [e.name for e in REGISTRY.values() if e.bundle == bundle and e.default]
        if len(defaults) != 1:
            raise ValueError(f"bundle {bundle!r} needs exactly one default weights entry, has {defaults}")


_check_one_default_per_bundle()
