"""How a graph keeps its KV cache: the one name for it (`KVForm`), from the build's `--kv-cache` to the
slots that serve it.

It lives on the ground floor because every stage names it: the recipe chooses it, the exporters emit
it, the manifest records it, the backends (the PyTorch reference here included) run it and the serving
engine's slots follow it. The values are the manifest's `kv_cache.form` strings, part of the artifact
format: they never change.
"""

from __future__ import annotations

import enum

from llamaexport import LlamaExportError


class KVForm(enum.StrEnum):
    """CONCAT: present = past ++ new (Concat), a new, longer cache every step; the past is the previous
    step's present (the portable graph for TensorRT < 10.15, the PyTorch reference).
    INPLACE: one max-length buffer [batch, kv_heads, context, head_dim] per tensor, bound as both past and
    present and written in place (the CPU graph's GroupQueryAttention; the portable graph's TensorScatter,
    TensorRT >= 10.15). The build's `--kv-cache concat|inplace` words are the members' names."""

    CONCAT = "past_present"
    INPLACE = "past_present_shared"

    @classmethod
    def of(cls, manifest: dict) -> KVForm:
        """The form an artifact's manifest records (kv_cache.form)."""
        form = (manifest.get("kv_cache") or {}).get("form")
        try:
            return cls(form)
        except ValueError:
            raise LlamaExportError(f"the manifest's kv_cache.form is {form!r}, not "
                                   f"{' or '.join(f.value for f in cls)}; rebuild the artifact") from None

    @classmethod
    def named(cls, word) -> KVForm:
        """A form from its `--kv-cache` word (concat, inplace: a member's name) or the member itself."""
        if isinstance(word, cls):
            return word
        by_word = {f.name.lower(): f for f in cls}
        if word not in by_word:
            raise LlamaExportError(f"unknown --kv-cache {word!r}; choose one of {', '.join(by_word)}")
        return by_word[word]


class SpareCache:
    """take_cache / give_back_cache of the Backend protocol, for a backend with `kv_form`, `empty_cache(batch)`
    and a `_spare` attribute (None at first): a finished generation's in-place cache is reused as it is by
    the next generation of its batch size (its buffers are already allocated and mapped; positions past the
    new sequence are masked out, so stale entries are never read). One spare in all: a cache of another
    batch size is let go. A concat cache grows by concatenation: nothing to recycle."""

    def take_cache(self, batch: int):
        if self.kv_form is KVForm.INPLACE and self._spare is not None and self._spare[0] == batch:
            cache, self._spare = self._spare[1], None
            return cache
        return self.empty_cache(batch)

    def give_back_cache(self, batch: int, cache):
        if self.kv_form is KVForm.INPLACE:
            self._spare = (batch, cache)
