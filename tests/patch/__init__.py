"""The patched (functional) model: ``monkeypatch``, fast weights and their history."""
