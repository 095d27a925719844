//! The web dashboard in a real browser: Debian's chromium driven through chromedriver
//! (WebDriver, `fantoccini`) against a real api and worker on a real PostgreSQL.

mod browser;
mod pages;
