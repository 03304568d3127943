"""LM Studio's `/repository` namespace, over a local catalogue: the models the stand-in has.

Read from the `lmstudio` SDK and lmstudio-js (`RepositoryNamespace`, `ModelSearchResultEntry`,
`ModelSearchResultDownloadOption`):
- `searchModels {opts: {searchTerm?, limit? (1-25), compatibilityTypes?}}` answers `{results: [{name,
  identifier: {type: "hf" | "catalog", identifier}, exact?, staffPick?}]}`;
- `getModelDownloadOptions {modelSearchResultIdentifier}` answers `{results: [{quantization?, name,
  sizeBytes, fitEstimation, recommended?, downloadIdentifier, indexedModelIdentifier}]}`;
- the `downloadModel {downloadIdentifier}` channel sends `downloadProgress {update: {downloadedBytes,
  totalBytes, speedBytesPerSecond}}`, `startFinalizing`, then `success {defaultIdentifier}`: "the
  model key which can be used to load the model" (lmstudio-js).

LM Studio searches Hugging Face and its own catalogue. The stand-in never goes to the network: its
repository is the models it serves, one entry per `PUBLISHER/REPO` folder of their LM Studio paths
(an `hf` identifier, as a Hugging Face repository is named), one download option per GGUF file. Each
is downloaded already, so a download finishes at once: one progress update with every byte, the
finalizing step, and the model's key (as REST v1 answers `already_downloaded` for a model it has).

Inferred, not read: how LM Studio matches a search term (here: a case-insensitive substring of the
repository's name or of one of its model keys; `exact` when the term is the name or a key) and how
it orders results (here: by name); that a download of a model already there reports its bytes at
once rather than nothing; `fitEstimation` (here always `fitWithoutGPU`: the stand-in runs on the CPU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import quantization

if TYPE_CHECKING:
    from .config import TestModel

MAX_RESULTS = 25  # the SDKs' limit on `limit`


class RepositoryRefused(Exception):
    """A look-up the repository refuses (answered as an error titled with the message)."""


def repository_of(model: TestModel) -> str:
    """The `PUBLISHER/REPO` a model's LM Studio path is in."""
    return model.lmstudio_path.rsplit("/", 1)[0]


class Repository:
    """The stand-in's models, as a repository to search and download from."""

    def __init__(self, models: dict[str, TestModel]):
        self.models = models  # the pool's: a model it serves later is in the repository too

    def _repositories(self) -> dict[str, list[TestModel]]:
        found: dict[str, list[TestModel]] = {}
        for model in self.models.values():
            found.setdefault(repository_of(model), []).append(model)
        return dict(sorted(found.items(), key=lambda item: item[0].lower()))

    def search(self, parameter: dict[str, Any]) -> dict[str, Any]:
        """`searchModels`: the repositories whose name or model keys contain the search term."""
        opts = parameter.get("opts") or {}
        term = str(opts.get("searchTerm") or "").lower()
        types = opts.get("compatibilityTypes")
        if types is not None and "gguf" not in types:
            return {"results": []}  # every model here is a GGUF file
        results = []
        for name, models in self._repositories().items():
            keys = [m.key.lower() for m in models]
            if term in name.lower() or any(term in key for key in keys):
                results.append({"name": name, "identifier": {"type": "hf", "identifier": name},
                                "exact": term in (name.lower(), *keys), "staffPick": False})
        results.sort(key=lambda result: not result["exact"])  # stable: by name otherwise
        return {"results": results[:min(int(opts.get("limit") or MAX_RESULTS), MAX_RESULTS)]}

    def options(self, parameter: dict[str, Any]) -> dict[str, Any]:
        """`getModelDownloadOptions`: one option per GGUF file of a repository found by a search."""
        identifier = (parameter.get("modelSearchResultIdentifier") or {}).get("identifier", "")
        models = self._repositories().get(identifier)
        if not models:
            raise RepositoryRefused(f"No model {identifier!r} in the repository: the lmflow test server's "
                                    "repository holds the models it serves (search for them with "
                                    "searchModels); it downloads nothing from the network")
        options = []
        for i, model in enumerate(models):
            option: dict[str, Any] = {
                "name": model.lmstudio_path.rsplit("/", 1)[1],  # the file's name in the models folder
                "sizeBytes": model.path.stat().st_size, "fitEstimation": "fitWithoutGPU",
                "recommended": i == 0, "downloadIdentifier": model.lmstudio_path,
                "indexedModelIdentifier": model.lmstudio_path}
            quant = quantization(option["name"])
            if quant:
                option["quantization"] = quant
            options.append(option)
        return {"results": options}

    def find(self, download_identifier: str) -> TestModel:
        """The model a download option names."""
        model = next((m for m in self.models.values() if m.lmstudio_path == download_identifier), None)
        if model is None:
            raise RepositoryRefused(f"Cannot download {download_identifier!r}: the lmflow test server "
                                    "downloads nothing from the network; its repository holds the models "
                                    f"it serves: {', '.join(m.lmstudio_path for m in self.models.values())}")
        return model

    @staticmethod
    def download_messages(model: TestModel) -> list[dict[str, Any]]:
        """What the `downloadModel` channel sends for a model that is here already."""
        size = model.path.stat().st_size
        return [{"type": "downloadProgress", "update": {"downloadedBytes": size, "totalBytes": size,
                                                        "speedBytesPerSecond": 0}},
                {"type": "startFinalizing"},
                {"type": "success", "defaultIdentifier": model.key}]
