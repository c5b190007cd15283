from .atomic import atomic_path, atomic_torch_save, atomic_write_bytes, atomic_write_json, atomic_write_text
from .images import make_grid, save_png, save_png16, save_tiff16, to_rows_cols
