"""The example application: purchases in (``checkout``, the web app), the warehouse and
finance tasks, the ledger. Built only on walrelay's public API."""
