"""Which caption a sample trains on: dropout, its original alt text, else a level x language draw, from
uniforms that are a pure function of (seed, epoch, file, row), so a resumed run on any number of ranks or
workers draws the same caption for the same sample (train.data's PackedBatches calls it per batch).

    pick = CaptionPicker(cfg.data, stage.levels, stage.languages)
    u = sample_uniforms(seed, epoch, file, rows)  # (n, 5) in [0, 1)
    caption = pick(text_columns_of_row_i, u[i])  # "" dropped, None nothing usable
"""

from __future__ import annotations

import logging

import numpy as np

from train.config import DataConfig
from unicap.contract import caption as caption_record

log = logging.getLogger("train.data")  # its warnings belong to the data path: train.data's logger


_G = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrap-around arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_uniforms(seed: int, epoch: int, file: int, rows: np.ndarray, k: int = 5) -> np.ndarray:
    """(n, k) uniforms in [0, 1), a pure function of (seed, epoch, file, row): a sample's caption draw
    in an epoch does not depend on the world size or the worker that reads it (nor on the micro-batch, unless
    data.group_caption_levels gives a micro-batch its first sample's level x language draw)."""
    with np.errstate(over="ignore"):
        key = np.zeros(1, np.uint64)
        for v in (seed, epoch, file):
            key = _mix(key ^ (np.uint64(v & 0xFFFFFFFFFFFFFFFF) + _G))
        x = _mix(key ^ np.asarray(rows, np.uint64))[:, None]  # (n, 1)
        x = _mix(x + _G * np.arange(1, k + 1, dtype=np.uint64))  # (n, k)
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53


class CaptionPicker:
    """Chooses one caption per sample: dropout, the original alt text, else a level x language draw."""

    def __init__(self, cfg: DataConfig, levels: tuple[str, ...], languages: tuple[str, ...]):
        self.dropout, self.original = cfg.caption_dropout, cfg.original_caption_weight
        lv = [(k, w) for k, w in cfg.level_weights.items() if w > 0 and k in levels]
        lg = [(k, w) for k, w in cfg.language_weights.items() if w > 0 and k in languages]
        unknown = set(cfg.level_weights) - set(levels) | set(cfg.language_weights) - set(languages)
        if unknown:
            log.warning(
                "caption weights for %s: not in the packed stage (levels %s, languages %s)",
                sorted(unknown),
                levels,
                languages,
            )
        self.levels = [k for k, _ in lv]
        self.level_cdf = np.cumsum([w for _, w in lv]) / max(sum(w for _, w in lv), 1e-12)
        self.languages = [k for k, _ in lg]
        self.language_cdf = np.cumsum([w for _, w in lg]) / max(sum(w for _, w in lg), 1e-12)
        self.pairs = [(caption_record.caption_column(a, b), wa * wb) for a, wa in lv for b, wb in lg]

    def __call__(self, text: dict, u: np.ndarray) -> str | None:
        """`text`: caption columns + original_caption of one sample; `u`: 5 uniforms. None: nothing usable."""
        original = (text.get("original_caption") or "").strip()
        have = [(c, w) for c, w in self.pairs if (text.get(c) or "").strip()]
        if not have and not original:
            return None
        if u[0] < self.dropout:
            return ""
        if original and (u[1] < self.original or not have):
            return original
        if self.levels and self.languages:
            col = caption_record.caption_column(
                self.levels[_draw(self.level_cdf, u[2])], self.languages[_draw(self.language_cdf, u[3])]
            )
            if (text.get(col) or "").strip():
                return text[col].strip()
        cdf = np.cumsum([w for _, w in have])  # the drawn caption is missing: redraw among those present
        return text[have[_draw(cdf / cdf[-1], u[4])][0]].strip()


def _draw(cdf: np.ndarray, u: float) -> int:
    """Index drawn by the uniform `u` from a normalised cumulative distribution."""
    return min(int(np.searchsorted(cdf, u, side="right")), len(cdf) - 1)
