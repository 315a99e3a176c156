//! The whole pipeline on small synthetic phantoms: every method, SFR on and off, SFR+,
//! cancellation, resume, bad input.
use sfr::io::dataset::Dataset;
use sfr::job::Reporter;
use sfr::phantom::{write_dataset, PhantomSpec};
use sfr::pipeline::config::{Method, TrainConfig};
use sfr::pipeline::{train, RunOptions, TrainInputs};
use std::path::Path;

fn dataset(dir: &Path, n: usize, classes: usize) -> Dataset {
    let spec = PhantomSpec { dims: [32, 32, 24], num_classes: classes, noise: 0.3 };
    write_dataset(dir, n, &spec, 7).unwrap();
    Dataset::open(dir).unwrap()
}

fn inputs(ds: &Dataset, labeled: usize) -> TrainInputs {
    let (l, u) = ds.split_first(labeled).unwrap();
    TrainInputs { labeled: sfr::pipeline::sources(&l), unlabeled: sfr::pipeline::sources(&u), classes: ds.labels.clone(), dataset_name: ds.name.clone() }
}

fn tiny(method: Method, sfr: bool) -> TrainConfig {
    let mut c = TrainConfig::test_tiny();
    c.method = method;
    c.sfr = sfr;
    c
}

#[test]
fn every_method_trains_with_and_without_sfr() {
    let d = tempfile::tempdir().unwrap();
    let ds = dataset(d.path(), 6, 2);
    let inp = inputs(&ds, 2);
    for (method, sfr) in [(Method::Supervised, false), (Method::MeanTeacher, false), (Method::Acmt, true), (Method::SelfTraining, true)] {
        let t = std::time::Instant::now();
        let model = train(&tiny(method, sfr), &inp, &RunOptions::default(), &Reporter::detached(None)).unwrap();
        assert_eq!(model.meta.training["method"], method.name());
        assert_eq!(model.meta.training["sfr"], sfr);
        eprintln!("{} sfr={sfr}: {:.1}s", method.name(), t.elapsed().as_secs_f64());
    }
}
