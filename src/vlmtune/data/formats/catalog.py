"""The built-in formats, one registry line each, in the order ``data.format`` lists them.

A new format is a module declaring its :class:`~vlmtune.data.formats.registry.Format`
and one line here; its ``detect_rank`` places it in detection.
"""

from __future__ import annotations

from vlmtune.data.formats.albef import ALBEF
from vlmtune.data.formats.coco import COCO
from vlmtune.data.formats.counting import COUNTING
from vlmtune.data.formats.csv_counts import CSV
from vlmtune.data.formats.flickr30k import FLICKR30K
from vlmtune.data.formats.geotext import GEOTEXT
from vlmtune.data.formats.hf import HF
from vlmtune.data.formats.internvl import INTERNVL
from vlmtune.data.formats.karpathy import KARPATHY
from vlmtune.data.formats.llava import LLAVA
from vlmtune.data.formats.pairs import GROUNDING, PAIRS
from vlmtune.data.formats.refcoco import REFCOCO
from vlmtune.data.formats.registry import FORMATS
from vlmtune.data.formats.sharegpt import SHAREGPT
from vlmtune.data.formats.swift import SWIFT
from vlmtune.data.formats.webdataset import WEBDATASET

FORMATS.register(PAIRS)
FORMATS.register(COCO)
FORMATS.register(KARPATHY)
FORMATS.register(ALBEF)
FORMATS.register(REFCOCO)
FORMATS.register(GEOTEXT)
FORMATS.register(GROUNDING)
FORMATS.register(COUNTING)
FORMATS.register(CSV)
FORMATS.register(HF)
FORMATS.register(INTERNVL)
FORMATS.register(LLAVA)
FORMATS.register(SWIFT)
FORMATS.register(SHAREGPT)
FORMATS.register(WEBDATASET)
FORMATS.register(FLICKR30K)
