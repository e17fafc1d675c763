"""bnnslim's own plugins, registered the same way as third-party ones."""
