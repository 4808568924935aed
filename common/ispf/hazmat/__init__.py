"""Raw curve operations. Dangerous to use directly: prefer `ispf.blinding`.

These functions take raw salt and scalar bytes because they run in worker
processes, where key objects (which refuse pickling) cannot travel.
"""
