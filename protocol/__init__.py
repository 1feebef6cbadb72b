"""Pure codecs: the page-map protocol, SCSI data and dm-switch messages. No I/O here."""
