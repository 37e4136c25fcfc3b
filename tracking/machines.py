"""Who fetches mail content without a person: what their requests look like.

A starting list, kept as data so an operator can add to it (`create_app(machine_agents=...,
machine_networks=...)`). Each entry's label becomes the verdict's `reason`.
"""

from __future__ import annotations

# Apple Mail Privacy Protection fetches every image of a message through Apple's proxies soon
# after it arrives, whether or not it is read. Those fetches name themselves "Mozilla/5.0"
# and nothing else, which no real browser or mail client sends.
APPLE_MPP_AGENT = "mozilla/5.0"

# Lower-case substrings of User-Agent headers, with the reason they give.
AGENT_MARKERS: dict[str, str] = {
    "googleimageproxy": "google-image-proxy",
    "ggpht.com": "google-image-proxy",
    "yahoomailproxy": "yahoo-mail-proxy",
    "barracuda": "scanner:barracuda",
    "mimecast": "scanner:mimecast",
    "proofpoint": "scanner:proofpoint",
    "symantec": "scanner:symantec",
    "messagelabs": "scanner:symantec",
    "forcepoint": "scanner:forcepoint",
    "trendmicro": "scanner:trendmicro",
    "trend micro": "scanner:trendmicro",
    "sophos": "scanner:sophos",
    "fireeye": "scanner:fireeye",
    "zscaler": "scanner:zscaler",
    "ironport": "scanner:cisco",
    "headlesschrome": "headless-browser",
    "phantomjs": "headless-browser",
    "python-": "http-library",
    "python/": "http-library",
    "aiohttp/": "http-library",
    "curl/": "http-library",
    "wget/": "http-library",
    "go-http-client": "http-library",
    "java/": "http-library",
    "okhttp": "http-library",
    "libwww-perl": "http-library",
    "apache-httpclient": "http-library",
    "axios/": "http-library",
    "node-fetch": "http-library",
    "scrapy": "http-library",
    "facebookexternalhit": "link-preview",
    "whatsapp/": "link-preview",
    "skypeuripreview": "link-preview",
    "bingpreview": "link-preview",
    "crawler": "bot",
    "spider": "bot",
}
# "bot" as a word ending (Googlebot/2.1, Slackbot-LinkExpanding, "bot;"), not inside a model
# name such as CUBOT_X30.
BOT_WORD = r"bot(?:[/;\s)\-]|$)"

# Address ranges of proxies and scanners (owners' published or long-observed ranges).
NETWORKS: dict[str, tuple[str, ...]] = {
    "apple-mpp": ("17.0.0.0/8",),
    "google-image-proxy": ("66.102.0.0/20", "66.249.64.0/19"),
    "scanner:microsoft": ("40.92.0.0/15", "40.107.0.0/16", "52.100.0.0/14", "104.47.0.0/17"),
    "scanner:mimecast": (
        "205.139.110.0/24",
        "207.211.30.0/24",
        "207.211.31.0/25",
        "91.220.42.0/24",
        "195.130.217.0/24",
    ),
    "scanner:proofpoint": ("148.163.128.0/19", "67.231.144.0/20"),
    "scanner:barracuda": ("64.235.144.0/20", "209.222.80.0/21"),
}
