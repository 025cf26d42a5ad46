//! The hypervisor's top-level modules form layers: no module imports, directly or through
//! others, a module that imports it. Checked by a test over the sources, so a new `use` that
//! closes a cycle fails `cargo xtask test` (issue 9: "no import cycle in hypervisor/src").

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// `module -> modules it names as crate::X`, outside comments.
    fn edges(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut stack = vec![src.to_path_buf()];
        let re = regex::Regex::new(r"crate::([a-z_0-9]+)").expect("valid");
        while let Some(dir) = stack.pop() {
            for e in std::fs::read_dir(&dir).expect("readable").flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                if p.extension().is_none_or(|x| x != "rs") {
                    continue;
                }
                let rel = p.strip_prefix(src).expect("inside");
                let first = rel.components().next().expect("non-empty");
                let module = first
                    .as_os_str()
                    .to_string_lossy()
                    .trim_end_matches(".rs")
                    .to_string();
                if module == "lib" || module == "main" {
                    continue;
                }
                let text = std::fs::read_to_string(&p).expect("readable");
                for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
                    for c in re.captures_iter(line) {
                        let to = c[1].to_string();
                        if to != module && to != "print" && to != "println" && to != "VERSION" {
                            out.entry(module.clone()).or_default().insert(to);
                        }
                    }
                }
            }
        }
        out
    }

    fn reaches(g: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &str) -> bool {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_string()];
        while let Some(x) = stack.pop() {
            if x == to {
                return true;
            }
            for y in g.get(&x).into_iter().flatten() {
                if seen.insert(y.clone()) {
                    stack.push(y.clone());
                }
            }
        }
        false
    }

    #[test]
    fn hypervisor_modules_have_no_import_cycle() {
        let g = edges(&crate::root().join("hypervisor/src"));
        assert!(g.contains_key("kernel") && g.contains_key("vcpu"), "{g:?}");
        let mut cycles = Vec::new();
        for (a, tos) in &g {
            for b in tos {
                if reaches(&g, b, a) {
                    cycles.push(format!("{a} -> {b}"));
                }
            }
        }
        assert!(
            cycles.is_empty(),
            "import cycles between hypervisor modules: {cycles:?}"
        );
    }

    #[test]
    fn the_checker_sees_a_cycle() {
        let mut g = BTreeMap::new();
        g.insert("a".to_string(), BTreeSet::from(["b".to_string()]));
        g.insert("b".to_string(), BTreeSet::from(["a".to_string()]));
        assert!(reaches(&g, "b", "a"));
    }
}
