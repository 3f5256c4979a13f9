"""The per-record API: cogalign's turns added to records in any pipeline (`datasets.map`, a
`DataLoader`, a training collator), byte for byte as `cogalign expand` writes them.

    aug = Augmenter(ExpandOptions(vq_resolution=336, px_resolution=32), image_root="data")
    out = aug.add_turns(record, index)          # one record
    ds = ds.map(aug.map_fn, with_indices=True, batched=True)

A record's random choices are seeded by (seed, P): P is the record's `cogalign_index` when it has
one, else its position in the input (the `index` argument); `expand` does the same. Give each
record its `cogalign_index` before a filter, shuffle or stream changes the positions.
"""
from __future__ import annotations

import operator
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from cogalign.errors import CogalignError, RecordError
from cogalign.expand.worker import EXPAND, PASS, REJECT, LocalEncoder, Prepared, WorkerContext, check_given, finish, \
    prepare, tokenizer_identity
from cogalign.expand.writer import dumps
from cogalign.inputs.embedded import EmbeddedImage
from cogalign.inputs.turns import to_llava
from cogalign.inputs.records import MAX_INDEX, choice_index
from cogalign.options import ExpandOptions
from cogalign.targets.plan import TurnPlan, plan_turns

__all__ = ["Augmenter"]


class Augmenter:
    """Adds the turns `cogalign expand` adds, one record (or one batch) at a time.

    `options`: what shapes the output (as for `expand`); the tokenizer (`options.vq`) and the templates
    (`options.templates`) are loaded once, here. `image_root`: the folder relative `image` paths
    resolve under (default: the current folder; made absolute here, once). `device`: where the VQ
    encoder runs (`auto`: a GPU if there is one). `tokenizer` is the loaded tokenizer (None without
    VQ targets); a change of its encoder mode (`set_encoder_mode`) shows in the provenance of the
    records made after it.

    An Augmenter pickles (and hashes, for `datasets`' cache) as its options, image root, device, the
    tokenizer's identity (name, content hash, encoder mode) and the templates' content hash; unpickled,
    it loads the tokenizer and templates again (and refuses them if their content changed).
    """

    def __init__(self, options: ExpandOptions | None = None, image_root: str | Path | None = None,
                 device: str = "auto"):
        from cogalign.expand.executor import Runtime, resolve_options

        self.options = options if options is not None else ExpandOptions()
        if not isinstance(self.options, ExpandOptions):
            raise CogalignError(f"Augmenter: options must be an ExpandOptions, got {type(self.options).__name__}")
        self.image_root = Path(os.path.abspath(image_root if image_root is not None else "."))  # not per call
        self.device = str(device)
        resolved, self.sampler, self.tokenizer = resolve_options(self.options, Runtime(device=self.device))
        self._ctx = WorkerContext.for_tokenizer(resolved, self.image_root, self.tokenizer, self.sampler)

    # -- pickling and hashing --------------------------------------------------------------

    def identity(self) -> dict | None:
        """The tokenizer's name, content hash and encoder mode (None without VQ targets)."""
        return tokenizer_identity(self.tokenizer) if self.tokenizer is not None else None

    def __reduce__(self):
        return (_restore, (self.options, str(self.image_root), self.device, self.identity(), self.sampler.content_hash))

    # -- the turns ---------------------------------------------------------------------------

    def plan(self, record: Mapping, index: int | None = None) -> list[TurnPlan]:
        """The choices `expand` makes for this record at this position (no image is read): one
        `TurnPlan` (kind, region, template_id, position) per target kind; [] for a record passed
        unchanged. A record whose shape expand rejects raises its `RecordError` (its image is not checked)."""
        record, given = _image_column(_chat_images(dict(record), index), index)
        check = check_given(to_llava(record)[0], given)
        if check.action == PASS:
            return []
        opts, ctx = self._ctx.options, self._ctx
        return plan_turns(opts.seed, self._position(record, _index(index)), check.n_pairs, opts.targets, opts.regions,
                          {"vq": opts.vq_resolution, "px": opts.px_resolution}, {"vq": ctx.vq_factor, "px": 1},
                          ctx.sampler)

    def add_turns(self, record: Mapping, index: int | None = None, image=None) -> dict:
        """The record as `expand` writes it at input position `index`: the new (human, gpt) pairs
        spliced into `conversations` and the `cogalign` provenance. A text-only (or video) record
        comes back unchanged. `image`: the record's image in memory or by path (a path, `pathlib.Path`,
        `PIL.Image`, uint8 array, bytes or a `{bytes, path}` dict), used instead of its (first) `image` value;
        a record without an `image` is passed (or rejected) as expand would, whatever `image` says.
        A record that cannot be expanded raises `RecordError` with `expand`'s reject reason."""
        return self.add_turns_batch([record], [index], [image])[0]

    def add_turns_batch(self, records: Sequence[Mapping], indices: Sequence[int | None] | None, images=None,
                        errors: str = "raise") -> list:
        """`add_turns` for many records, their VQ crops encoded in batches of one shape (for GPUs).
        `indices=None`: each record's `cogalign_index`. `errors="return"` puts each reject's
        `RecordError` in its place in the list instead of raising."""
        if errors not in ("raise", "return"):
            raise ValueError(f"errors={errors!r}: choose 'raise' or 'return'")
        if isinstance(records, Mapping):
            raise CogalignError(f"Augmenter.add_turns_batch: records is a mapping of {len(records)} columns (a "
                                "datasets batch?); give a list of records, or use map_fn on column batches")
        indices = [None] * len(records) if indices is None else [_index(i) for i in indices]
        images = [None] * len(records) if images is None else list(images)
        if not len(records) == len(indices) == len(images):
            raise ValueError(f"{len(records)} records, {len(indices)} indices and {len(images)} images: give one of each")
        ctx = self._ctx
        if self.tokenizer is not None:
            ctx.tokenizer = tokenizer_identity(self.tokenizer)  # what encodes now, as provenance says
        encoder = LocalEncoder(self.tokenizer, batch_size=max(1, len(records)))
        work = []
        for record, index, image in zip(records, indices, images):
            prepared = self._prepare(record, index, image)
            ticket = encoder.submit(prepared.vq_inputs) if prepared.outcome == EXPAND and prepared.vq_inputs else None
            work.append((prepared, ticket))
        out = []
        for prepared, ticket in work:
            if prepared.outcome not in (EXPAND, PASS):
                error = RecordError(prepared.reason, f"record {prepared.index}"
                                    f"{'' if prepared.record_id is None else f' (id {prepared.record_id!r})'}: "
                                    f"{prepared.detail}")
                if errors == "raise":
                    raise error
                out.append(error)
                continue
            out.append(finish(prepared, encoder.result(ticket) if ticket is not None else [], ctx))
        return out

    def map_fn(self, rows, indices=None, errors: str = "raise") -> dict:
        """For `datasets`: `ds.map(aug.map_fn, with_indices=True, batched=True)` (or not batched).
        Returns the columns `expand`'s parquet shards hold for these records: `conversations` with the
        new turns and `cogalign`, the provenance as JSON text (None for a record passed unchanged).
        `indices`: the rows' positions (with_indices), unless the rows carry a `cogalign_index` column.
        A reject raises `RecordError`; with `errors="mark"` (`fn_kwargs={"errors": "mark"}`) its row keeps
        its turns and the provenance it had (none, unless it was expanded before), and a `cogalign_reject`
        column says why (None for the other rows). Chat-format rows (`messages`) get `conversations`;
        drop the stale `messages` (`remove_columns=["messages"]`) as expand does."""
        if errors not in ("raise", "mark"):
            raise ValueError(f"errors={errors!r}: choose 'raise' or 'mark'")
        batch = isinstance(indices, Sequence) or (indices is None and _is_batch(rows))
        if batch:
            n = len(next(iter(rows.values()))) if len(rows) else 0
            records = [{key: rows[key][i] for key in rows} for i in range(n)]
        else:
            records, n = [rows], 1
        positions = list(indices) if batch and indices is not None else [None] * n if batch else [indices]
        if any(p is None and isinstance(r, Mapping) and r.get("cogalign_index") is None for p, r in zip(positions, records)):
            raise CogalignError("Augmenter.map_fn: a row has no position: pass with_indices=True to ds.map, or give "
                                "the rows a `cogalign_index` column (before any filter or shuffle)")
        done = self.add_turns_batch(records, positions, errors="raise" if errors == "raise" else "return")
        columns = {"conversations": [], "cogalign": []}
        rejects = []
        for record, out in zip(records, done):
            failed = isinstance(out, RecordError)
            columns["conversations"].append((record if failed else out).get("conversations"))
            columns["cogalign"].append(_provenance_json(record if failed else out))  # a reject keeps what it had
            rejects.append(str(out) if failed else None)
        if errors == "mark":
            columns["cogalign_reject"] = rejects
        return columns if batch else {key: values[0] for key, values in columns.items()}

    def output_features(self, features, errors: str = "raise"):
        """The `datasets.Features` of `ds.map(aug.map_fn, ...)`'s rows, for its `features=`: `features` (the
        input's, `ds.features`) with `cogalign` (and, for `errors="mark"`, `cogalign_reject`) as strings, and
        `conversations` for chat-format input. Without it datasets types a new column from the first batch
        it writes, and one whose values were all None there (text-only records, no reject) stops the map
        at its first later value. None (a stream whose features are unknown) gives None."""
        import datasets

        if errors not in ("raise", "mark"):
            raise ValueError(f"errors={errors!r}: choose 'raise' or 'mark'")
        if features is None:
            return None
        out = datasets.Features(features)
        if "conversations" not in out:  # chat-format input: the LLaVA turns expand writes
            out["conversations"] = [{"from": datasets.Value("string"), "value": datasets.Value("string")}]
        out["cogalign"] = datasets.Value("string")
        if errors == "mark":
            out["cogalign_reject"] = datasets.Value("string")
        return out

    # -- helpers --------------------------------------------------------------------------------

    def _position(self, record: Mapping, index: int | None) -> int:
        if index is None and record.get("cogalign_index") is None:
            raise CogalignError("Augmenter: give the record's position in the input (index=) or a "
                                "`cogalign_index` in the record; its choices are seeded by it")
        return choice_index(record, index)

    def _prepare(self, record: Mapping, index: int | None, image) -> Prepared:
        record = dict(record) if isinstance(record, Mapping) else record
        if isinstance(record, dict):
            if index is None:
                try:
                    index = self._position(record, index)
                except RecordError as e:
                    return Prepared(0, record, REJECT, e.reason, e.detail)
            record, held = _image_column(_chat_images(record, index), index)
            image = held if image is None else image
        elif index is None:
            index = 0
        return prepare(index, record, self._ctx, image)


def _index(value) -> int | None:
    """A record's position as given (`index=`): an integer from 0 to 2**63 - 1, or None."""
    if value is None:
        return None
    try:
        index = operator.index(value)  # numpy integers too, not floats or strings
    except TypeError:
        index = -1
    if isinstance(value, bool) or not 0 <= index <= MAX_INDEX:
        raise CogalignError(f"Augmenter: index={value!r}: expected the record's position in the input, an integer "
                            f"from 0 to {MAX_INDEX} (or None to use its `cogalign_index`)")
    return index


_NO_IMAGE = object()


def _image_item(value, name: str):
    """One `image` value as expand's parquet reader takes it: a `{bytes, path}` dict (a `datasets` Image
    cell) as an EmbeddedImage (its bytes) or its path, or _NO_IMAGE (neither); any other value as it is."""
    if not (isinstance(value, dict) and set(value) <= {"bytes", "path"}):
        return value
    if value.get("bytes") is not None:
        return EmbeddedImage(value.get("path") or name, value["bytes"])
    return value["path"] if value.get("path") is not None else _NO_IMAGE


def _chat_images(record: dict, index: int | None) -> dict:
    """A chat-format record's `images` list (the TRL / HF layout, beside `messages`) as its `image`, as
    expand's readers and `to_llava` take it, its `{bytes, path}` items read as `_image_item` reads them."""
    images = record.get("images")
    if "image" in record or "conversations" in record or not isinstance(record.get("messages"), list) \
            or not isinstance(images, list):
        return record
    name = f"embedded-{0 if index is None else index}"
    items = [v for v in (_image_item(v, f"{name}-{k}") for k, v in enumerate(images)) if v is not _NO_IMAGE]
    record = {("image" if k == "images" else k): v for k, v in record.items() if k != "images" or items}
    if items:
        record["image"] = items[0] if len(items) == 1 else items
    return record


def _image_column(record: dict, index: int | None) -> tuple[dict, object]:
    """(the record with its `image` value read as `expand` reads a parquet cell, the image it holds in
    memory or None): `{bytes, path}` dicts become the path (their bytes kept), empty ones no image (the
    key dropped, as expand drops it); a PIL image, array or bytes, alone or first of a list, is the image
    given for the record's pixels. A list keeps its other items (only the first image is read)."""
    value = record.get("image")
    if value is None or isinstance(value, str):
        return record, None
    name = f"embedded-{0 if index is None else index}"
    if isinstance(value, list):
        items = [_image_item(v, f"{name}-{k}") for k, v in enumerate(value)]
        value = [v for v in items if v is not _NO_IMAGE] if value else value
        if value == []:
            record.pop("image")
            return record, None
        record["image"] = value
        return record, None if isinstance(value[0], str) else value[0]
    value = _image_item(value, name)
    if value is _NO_IMAGE:
        record.pop("image")
        return record, None
    record["image"] = value
    return record, None if isinstance(value, str) else value


def _is_batch(rows) -> bool:
    """A `datasets` batch (every column a list of one length, the turns column a list of lists or
    nulls), not one row (whose turns column holds turns, is empty, or is not a list)."""
    if not isinstance(rows, Mapping) or not rows:
        return False
    turns = rows.get("conversations", rows.get("messages"))
    if not isinstance(turns, list) or any(t is not None and not isinstance(t, list) for t in turns):
        return False
    return all(isinstance(column, list) and len(column) == len(turns) for column in rows.values())


def _provenance_json(record: dict) -> str | None:
    """The provenance as `expand`'s parquet `cogalign` column holds it (JSON text, kept as it is)."""
    value = record.get("cogalign")
    return value if value is None or isinstance(value, str) else dumps(value).decode()


def _restore(options: ExpandOptions, image_root: str, device: str, identity: dict | None,
             templates_hash: str | None = None) -> Augmenter:
    aug = Augmenter(options, image_root, device)
    if templates_hash is not None and aug.sampler.content_hash != templates_hash:
        raise CogalignError(f"Augmenter: the templates {options.templates or '(built in)'} have content hash "
                            f"{aug.sampler.content_hash} here, {templates_hash} where the Augmenter was pickled; "
                            "keep the templates file unchanged while a pipeline runs")
    if identity is not None:
        if aug.tokenizer.content_hash != identity["content_hash"]:
            raise CogalignError(f"Augmenter: tokenizer {options.vq!r} has content hash {aug.tokenizer.content_hash} "
                                f"here, {identity['content_hash']} where the Augmenter was pickled; give both the same "
                                "tokenizer files")
        mode = (identity["precision"], identity["layout"] == "channels_last", identity["compile"])
        if tokenizer_identity(aug.tokenizer) != identity:
            aug.tokenizer.set_encoder_mode(*mode)
    return aug
