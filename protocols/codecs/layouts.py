"""Reference layouts for benchmarks and tests, written out by hand (``protocols`` imports no models).

:func:`resnet50_layout` is torchvision's ``resnet50()`` parameter list in ``parameters()`` order
(conv weights, batch-norm weight and bias, the 1000-way fc): 161 tensors, 25,557,032 elements.
"""

from __future__ import annotations

from protocols.codecs.base import Layout

RESNET50_NUMEL = 25_557_032


def _bottleneck(inplanes: int, planes: int, downsample: bool) -> list[tuple[int, ...]]:
    out = planes * 4
    shapes: list[tuple[int, ...]] = [(planes, inplanes, 1, 1), (planes,), (planes,),
                                     (planes, planes, 3, 3), (planes,), (planes,),
                                     (out, planes, 1, 1), (out,), (out,)]
    if downsample:
        shapes += [(out, inplanes, 1, 1), (out,), (out,)]
    return shapes


def resnet50_layout() -> Layout:
    """ResNet-50 (He et al. 2016, torchvision v1.5 layout) parameter shapes; ``numel == 25,557,032``."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            shapes += _bottleneck(inplanes, planes, downsample=block == 0)
            inplanes = planes * 4
    shapes += [(1000, 2048), (1000,)]
    return Layout(tuple(shapes))
