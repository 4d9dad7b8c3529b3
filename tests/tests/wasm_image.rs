//! The filter's OCI image for Istio's `WasmPlugin` (`make images`, `make test-envoy`;
//! feature `real-envoy`): the image `envoy/istio/wasmplugin.yaml` pulls is the one the
//! Makefile builds, and it is what Istio's "compat" wasm image format expects — built
//! `FROM scratch`, a single layer holding one file, `plugin.wasm`, which is the module
//! (`target/wasm32-wasip1/wasm/mcp_affinity_filter.wasm`) byte for byte.
//!
//! Needs a Docker engine (`make setup-docker`). Without one the test prints `SKIPPED` and
//! passes — unless `REQUIRE_DOCKER=1` (`make test-envoy` sets it), which makes it fail.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use mcp_affinity_harness::envoy::workspace_root;
use mcp_affinity_harness::process::filter_wasm;

/// `true` when a Docker engine answers; otherwise fails under `REQUIRE_DOCKER`, else
/// prints a `SKIPPED` line.
fn docker_or_skip(test: &str) -> bool {
    let ok = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success() && !String::from_utf8_lossy(&o.stdout).trim().is_empty());
    if ok {
        return true;
    }
    let required = std::env::var("REQUIRE_DOCKER").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false"));
    assert!(!required, "wasm_image::{test}: no Docker engine answers and REQUIRE_DOCKER is set (make setup-docker)");
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "wasm_image::{test}: SKIPPED — no Docker engine answers (REQUIRE_DOCKER=1 turns this into a failure)");
    false
}

/// Runs `cmd`, panics with its stderr when it fails, returns its stdout.
fn run(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The image reference of `envoy/istio/wasmplugin.yaml` (`spec.url` without `oci://`).
fn wasmplugin_image() -> String {
    let path = workspace_root().join("envoy/istio/wasmplugin.yaml");
    let doc: serde_json::Value = serde_norway::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let url = doc["spec"]["url"].as_str().unwrap_or_else(|| panic!("{}: no spec.url", path.display()));
    url.strip_prefix("oci://").unwrap_or_else(|| panic!("{}: spec.url {url:?} is not oci://", path.display())).to_string()
}

/// A fresh scratch directory.
fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mcp-affinity-wasm-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The entries of the tar file `path` (`tar -tf`), `./` prefixes removed, directories
/// (`/` at the end) left out.
fn tar_entries(path: &Path) -> Vec<String> {
    run(Command::new("tar").arg("-tf").arg(path))
        .lines()
        .map(|l| l.trim_start_matches("./").to_string())
        .filter(|l| !l.is_empty() && !l.ends_with('/'))
        .collect()
}

#[test]
fn make_images_builds_the_image_wasmplugin_yaml_names_and_its_one_layer_is_the_module() {
    let image = wasmplugin_image();
    // The Makefile's `images` target tags the filter image with that name.
    let makefile = std::fs::read_to_string(workspace_root().join("Makefile")).unwrap();
    assert!(makefile.lines().any(|l| l.trim() == format!("WASM_IMAGE ?= {image}")), "the Makefile's WASM_IMAGE is not {image}");
    assert!(makefile.contains("docker build -f envoy/wasm-image/Dockerfile -t $(WASM_IMAGE)"), "make images does not build envoy/wasm-image/Dockerfile as $(WASM_IMAGE)");
    if !docker_or_skip("make_images_builds_the_image_wasmplugin_yaml_names") {
        return;
    }
    let module = std::fs::read(filter_wasm()).unwrap();
    let dir = scratch();

    // What `make images` runs, with the module alone in the build context.
    let context = dir.join("context");
    std::fs::create_dir_all(&context).unwrap();
    std::fs::write(context.join("mcp_affinity_filter.wasm"), &module).unwrap();
    let dockerfile = workspace_root().join("envoy/wasm-image/Dockerfile");
    run(Command::new("docker").args(["build", "-q", "-f"]).arg(&dockerfile).args(["-t", &image]).arg(&context));

    // One layer in the image's configuration…
    let layers = run(Command::new("docker").args(["image", "inspect", "--format", "{{len .RootFS.Layers}}", &image]));
    assert_eq!(layers.trim(), "1", "{image} has {} layers", layers.trim());

    // …and in the saved image: the layer holds plugin.wasm only, the module byte for byte.
    let saved = dir.join("image.tar");
    run(Command::new("docker").args(["save", "-o"]).arg(&saved).arg(&image));
    let unpacked = dir.join("image");
    std::fs::create_dir_all(&unpacked).unwrap();
    run(Command::new("tar").arg("-xf").arg(&saved).arg("-C").arg(&unpacked));
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(unpacked.join("manifest.json")).unwrap()).unwrap();
    let layers = manifest[0]["Layers"].as_array().unwrap_or_else(|| panic!("manifest.json: {manifest}"));
    assert_eq!(layers.len(), 1, "{manifest}");
    let layer = unpacked.join(layers[0].as_str().unwrap());
    assert_eq!(tar_entries(&layer), ["plugin.wasm"], "the layer of {image}");
    let files = dir.join("layer");
    std::fs::create_dir_all(&files).unwrap();
    run(Command::new("tar").arg("-xf").arg(&layer).arg("-C").arg(&files));
    let plugin = std::fs::read(files.join("plugin.wasm")).unwrap();
    assert!(plugin == module, "plugin.wasm ({} bytes) is not the module ({} bytes)", plugin.len(), module.len());
    let _ = std::fs::remove_dir_all(&dir);
}
