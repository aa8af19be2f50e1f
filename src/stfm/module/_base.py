"""The contract every expression module fulfils, so that :class:`stfm.model.ExpressionModelBase` can predict,
smooth and score any of them the same way (no AnnData inside)."""

from __future__ import annotations

import torch
from scvi.module.base import BaseModuleClass

__all__ = ["ExpressionModuleBase"]


class ExpressionModuleBase(BaseModuleClass):
    """Base of the torch modules behind stfm's expression methods.

    Besides scvi-tools' ``inference`` / ``generative`` / ``loss``, a module implements

    :meth:`predict_batch`
        ``tensors`` (registry keys → batch tensors; counts may be zeros for an H&E-only query) → ``{'scale':
        (b, n_genes) composition summing to 1 over the panel, 'log_library': (b,) predicted log library size,
        'aux': {name: (b, …) tensor}}``. The model multiplies ``scale`` by the library size the user asks for;
        neighbour smoothing averages ``scale``, ``log_library`` and every ``aux`` tensor over spatial neighbours.
    :meth:`predictive_std` (optional)
        the predictive standard deviation of counts with mean ``mean``, given the (smoothed) ``aux`` tensors.
    """

    #: whether :meth:`predictive_std` is implemented
    has_std: bool = False

    def predict_batch(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | dict[str, torch.Tensor]]:
        """Composition, predicted log library size and auxiliary tensors for one minibatch."""
        raise NotImplementedError

    def predictive_std(self, mean: torch.Tensor, aux: dict[str, torch.Tensor]) -> torch.Tensor:
        """Predictive standard deviation of counts whose mean is ``mean``."""
        msg = f"{type(self).__name__} has no predictive distribution, so no standard deviation."
        raise NotImplementedError(msg)

    @torch.inference_mode()
    def sample(self, tensors: dict[str, torch.Tensor], n_samples: int = 1) -> torch.Tensor:
        """Poisson draws around the mean at the predicted library size, ``(n_samples, b, n_genes)`` (squeezed at 1).

        Modules with a likelihood (ZINB) override this with draws from it.
        """
        out = self.predict_batch(tensors)
        mean = out["scale"] * torch.exp(out["log_library"]).unsqueeze(-1)
        draws = torch.poisson(mean.expand(n_samples, *mean.shape))
        return draws[0] if n_samples == 1 else draws
