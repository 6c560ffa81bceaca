"""The translation worker: /mol2cap, /cap2mol, batch jobs and adapters over icma."""
