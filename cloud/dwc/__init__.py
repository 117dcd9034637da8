"""DWC, dynamic weight-update compression: device mirror, energy-ranked units, quantized deltas."""

from cloud.dwc.compressor import CloudMirror, DWCConfig, DWCUpdate, compress, full_state_bytes

__all__ = ["CloudMirror", "DWCConfig", "DWCUpdate", "compress", "full_state_bytes"]
