"""``medfm.load``: a bundle's network, weights and preprocessing as one object, for scans in memory or on disk.

>>> model = medfm.load("tissue_seg")                       # a task bundle (or a foundation bundle)
>>> label = model.predict(volume, affine)                 # numpy (X, Y, Z) + 4x4 RAS affine, a MetaTensor, or a path
>>> vector = medfm.load("models_genesis_chest_ct").embed(volume, affine)  # a task bundle's: its fine-tuned encoder

Each call runs exactly what ``medfm infer`` / ``medfm embed`` run for one input (the same runner, network
call and writer), without writing files: the results equal the CLI's.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .bundles import Bundle, bundle_config
from .errors import MedfmError

__all__ = ["Model", "load"]


class Model:
    """A bundle ready to run: ``embed`` (every bundle's ``configs/embed.json``) and ``predict`` (task bundles).

    Args:
        bundle: bundle name or folder.
        device: where the network runs (default: CUDA when present, else the CPU).
        overrides: config values, as ``--key value`` on the command line (e.g. ``ckpt_path``, ``sw_batch_size``).

    The network is built and its weights loaded (strictly) on first use, once per kind of call.
    """

    def __init__(self, bundle: str | os.PathLike, device: str | None = None, **overrides) -> None:
        from .inference import EMBED_CONFIG

        self.bundle = Bundle.find(bundle)
        self.bundle_dir = self.bundle.root
        self.name = self.bundle.name
        self.device = device
        self.overrides = overrides
        self.can_predict = self.bundle.runs_cohorts
        self.can_embed = self.bundle.config(EMBED_CONFIG).is_file()
        self._runners: dict[str, object] = {}
        self.weights: dict[str, str] = {}

    def __repr__(self) -> str:
        kinds = [kind for kind, able in (("embed", self.can_embed), ("predict", self.can_predict)) if able]
        return f"Model({self.name!r}: {', '.join(kinds) or 'nothing to run'})"

    def _runner(self, kind: str):
        """The bundle's own runner for ``kind`` (``embedder`` of embed.json, ``runner`` of a task bundle), built once."""
        from .inference import EMBED_CONFIG, check_overrides, refuse_fine_tuned_checkpoint

        if kind not in self._runners:
            configs, key, inputs = (["inference.json", EMBED_CONFIG], "embedder", "embed_inputs") if kind == "embed" \
                else (["inference.json"], "runner", "inputs")
            settings = dict(self.overrides, **({"device": self.device} if self.device else {}))
            check_overrides(self.bundle_dir, configs, settings)
            refuse_fine_tuned_checkpoint(self.bundle_dir, settings)
            parser = bundle_config(self.bundle_dir, configs)
            parser[inputs] = []
            parser["progress"] = False
            for name, value in settings.items():
                parser[name] = value
            runner = parser.get_parsed_content(key)
            self.weights[kind] = runner.load_weights()
            self._runners[kind] = runner
        return self._runners[kind]

    def _run(self, kind: str, image, affine):
        from .io.reading import in_memory_scan

        runner = self._runner(kind)
        source = str(Path(image).expanduser().absolute()) if isinstance(image, (str, os.PathLike)) else in_memory_scan(image, affine)
        preprocessed = runner.preprocessing({"image": source})["image"]
        name = source if isinstance(source, str) else str(source.meta["filename_or_obj"])
        return runner.writer.result(preprocessed, runner.infer(preprocessed), name)

    def embed(self, image, affine=None) -> np.ndarray:
        """The embedding (float32 vector) of one scan: a path, a numpy array or tensor ``(X, Y, Z)`` with its
        ``affine`` (4 x 4 voxel-to-world, RAS, mm: nibabel's ``image.affine``), or a MetaTensor."""
        if not self.can_embed:
            from .inference import require_embedding_workflow

            require_embedding_workflow(self.bundle)
        return self._run("embed", image, affine)

    def predict(self, image, affine=None):
        """A task bundle's result for one scan (given as for :meth:`embed`): a segmentation is a MetaTensor
        ``(1, X, Y, Z)`` of label values on the input's grid (its affine); a classification the probabilities by
        class name; a regression the value."""
        if not self.can_predict:
            raise MedfmError(f"{self.name}: is not a task bundle, so it predicts nothing; make one with `medfm finetune` "
                             "(or use .embed)")
        return self._run("predict", image, affine)


def load(bundle: str | os.PathLike, device: str | None = None, **overrides) -> Model:
    """A bundle (foundation or task, by name or folder) as a :class:`Model`."""
    return Model(bundle, device=device, **overrides)
