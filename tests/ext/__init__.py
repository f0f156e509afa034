"""The JIT build (``loft._ext``, ``loft.build``): cache keys, warm loads, fallbacks. (Not
``tests/build``: pytest does not collect folders named ``build``.)"""
