"""See what targets mean: `show` (one record as a PNG) and `gallery` (a static HTML page)."""
from cogalign.inspect.gallery import sample_records, write_gallery
from cogalign.inspect.panels import Panel, RecordView, compose, psnr_db, view_record
from cogalign.inspect.records import find_record, iter_records, targets

__all__ = ["Panel", "RecordView", "compose", "find_record", "iter_records", "psnr_db", "sample_records",
           "targets", "view_record", "write_gallery"]
