"""Lightning glue of :class:`~spe_lightning.SPECallback`: its settings, schedule, DDP shards and publishing.

The callback's hooks are short guards that call these helpers (as Lightning's own callbacks do); the SPE work
itself belongs to :class:`~spe_lightning.SPERun`, which knows nothing of Lightning.
"""
