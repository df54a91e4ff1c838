"""Code the tests share: builders, strategies and process helpers, imported as `helpers.<module>`.

Test modules import from here and never from each other. pytest puts tests/ on sys.path (it holds
conftest.py), and the processes the tests spawn inherit that path, so they can import these too.
"""
