"""Input sources (one module per role: files.py, celeba_files.py, planning.py, readers.py): what the pipeline reads, found on the launcher, read on the workers.

An input is named by a spec string, `[NAME=]KIND:LOCATION`:

  celeba:DIR     a CelebA download (img_align_celeba/ plus the annotation files)
  folder:DIR     DIR/<identity>/<image>, one subfolder per identity
  wds:PATTERN    WebDataset tars as img2dataset writes them (brace and glob patterns)
  wds:DIR        the *.tar files directly in DIR (the folder img2dataset wrote), sorted
  lsun:DIR       an LSUN category folder holding data.mdb (an LMDB database; lsun.py)

Every key an input produces starts with its namespace (`input_namespaces`): NAME when given
(`laion=wds:/data/laion`), else its kind, numbered from the second unnamed input of a kind on
(`wds`, `wds1`, ...). An input that exists but yields nothing raises at planning
(FileNotFoundError), before anything is written.

Small things (file listings, annotation files) are planned on the launcher by plain
functions (`plan_celeba`, `plan_folder`, `plan_wds`) that return typed `SourceItem`s, the
`DeadLetter`s found while planning and a `SourceReport` for the manifest. Reading image bytes
is fanned out in Beam DoFns (`ReadImageBytes`, `ReadWdsShard`). All file access goes through
`apache_beam.io.filesystems.FileSystems`, so local paths and gs:// work alike.

Annotation files are real-world data with quirks (header lines, truncation, mixed
separators); every quirk is reported as a warning, never guessed away silently.
"""

from prep.transforms.sources.celeba_files import (  # noqa: F401
    CELEBA_ATTRIBUTES,
    CELEBA_IDENTITY,
    CELEBA_IMAGE_DIR,
    CELEBA_PARTITION,
    CELEBA_SPLITS,
    read_attribute_file,
    read_identity_file,
    read_partition_file,
)
from prep.transforms.sources.files import (  # noqa: F401
    FOLDER_IMAGE_EXTS,
    find_annotation,
    normalize_root,
)
from prep.transforms.sources.lsun import check_lsun_location, plan_lsun  # noqa: F401
from prep.transforms.sources.planning import (  # noqa: F401
    SOURCE_KINDS,
    InputSpec,
    check_location,
    input_namespaces,
    parse_input,
    parse_input_spec,
    plan_celeba,
    plan_folder,
    plan_wds,
)
from prep.transforms.sources.readers import WDS_IMAGE_EXTS, ReadImageBytes, ReadWdsShard  # noqa: F401
