"""edgepack packager: builds signed per-device bundles on a build server."""
