/// The parity runner: every fixture file is read and either passes or is reported (here: skipped) as not
/// implemented, never counted as a pass.
module DiffBIR.Lab.Tests.ParityTests

open System.IO
open Xunit
open FsUnit.Xunit
open TorchSharp
open DiffBIR.Lab.Parity
open DiffBIR.Lab.Tests.TestSupport

let fixtureFiles : TheoryData<string> =
    let data = TheoryData<string>()
    for f in ParityRunner.FindFixtures [ fixturesDir ] do data.Add(Path.GetRelativePath(fixturesDir, f))
    data

/// One test per fixture file. A case we have not implemented yet is a skipped test carrying its name.
[<Theory>]
[<MemberData(nameof fixtureFiles)>]
let ``fixture matches the official code`` (relative: string) =
    let runner = ParityRunner.Default()
    let case = Fixture.CaseOf(fixture relative)
    if not (runner.IsImplemented case) then
        Assert.Skip(sprintf "case '%s' (%s) is not implemented yet" case relative)
    assertParity relative |> ignore

[<Fact>]
let ``the runner reads every fixture file and finds the cases of both folders`` () =
    let files = ParityRunner.FindFixtures [ fixturesDir ]
    let cases = files |> List.ofSeq |> List.map Fixture.CaseOf
    files.Count |> should be (greaterThanOrEqualTo 30)
    cases |> should contain "vae"
    cases |> should contain "v2_sampler_guided"
    cases |> should contain "checkpoint_formats"
    cases |> List.exists (fun c -> c.StartsWith "unknown:") |> should be False

[<Fact>]
let ``a safetensors file that names no case is not a fixture; an unreadable one is, so that running it reports why`` () =
    use dir = new TempDir()
    let caseless = dir.File "model.safetensors"
    DiffBIR.Lab.Checkpoints.SafeTensors.Save(caseless, System.Collections.Generic.Dictionary(dict [ "w", torch.zeros(2L) ]),
                                            System.Collections.Generic.Dictionary<string, string>())
    Fixture.CaseOf caseless |> should equal "unknown:model.safetensors"
    Fixture.IsFixtureFile caseless |> should be False
    ParityRunner.FindFixtures [ dir.Path ] |> should be Empty
    let broken = dir.File "broken.safetensors"
    File.WriteAllBytes(broken, Array.init 64 byte)
    Fixture.IsFixtureFile broken |> should be True
    ParityRunner.Default().RunFile(broken).Status |> should equal CaseStatus.Error
    Fixture.IsFixtureFile(fixture "diffusion_schedule.safetensors") |> should be True

[<Fact>]
let ``an unimplemented case is reported as such, not as a pass`` () =
    let runner = ParityRunner([ DiffusionScheduleCase() :> IParityCase ])
    let r = runner.RunFile(fixture "vae.safetensors")
    r.Status |> should equal CaseStatus.NotImplemented
    r.Case |> should equal "vae"
    r.Outputs |> should be Empty

/// A deliberately wrong implementation must fail: proves the comparison can fail.
type private WrongSchedule() =
    interface IParityCase with
        member _.Case = "diffusion_schedule"
        member _.Description = "off by 1e-3"
        member _.DefaultTolerance = Tolerance(1e-6, 0.0)
        member _.Run f =
            (DiffusionScheduleCase() :> IParityCase).Run f
            |> Seq.map (fun o -> CaseOutput(o.Name, o.Actual.add(torch.tensor(1e-3).to_type(o.Actual.dtype)), Tolerance = o.Tolerance))

[<Fact>]
let ``a wrong implementation fails with its error measured`` () =
    let r = ParityRunner([ WrongSchedule() :> IParityCase ]).RunFile(fixture "diffusion_schedule.safetensors")
    r.Status |> should equal CaseStatus.Fail
    let betas = r.Outputs |> Seq.find (fun o -> o.Name = "v2.betas")
    betas.Pass |> should be False
    betas.MaxAbs |> should (equalWithin 1e-9) 1e-3
    betas.MaxRel |> should (equalWithin 1e-6) (1e-3 / 0.012)

[<Fact>]
let ``a tolerance override applies to every output`` () =
    let r = ParityRunner([ WrongSchedule() :> IParityCase ]).RunFile(fixture "diffusion_schedule.safetensors", Tolerance(0.0, 2e-3))
    r.Status |> should equal CaseStatus.Pass

[<Fact>]
let ``max_rel is max abs difference over max abs reference; shapes must agree`` () =
    use a = torch.tensor([| 1.0f; 2.0f; 3.5f |])
    use b = torch.tensor([| 1.0f; -4.0f; 3.0f |])
    let r = ParityRunner.Compare("x", a, b, Tolerance(0.0, 10.0))
    r.MaxAbs |> should (equalWithin 1e-12) 6.0
    r.MaxRel |> should (equalWithin 1e-12) 1.5
    r.Pass |> should be True
    use c = torch.zeros(4L)
    let s = ParityRunner.Compare("x", a, c, Tolerance(1.0, 1.0))
    s.Pass |> should be False
    s.Note |> should haveSubstring "shape"

[<Fact>]
let ``NaN in our output fails even with a loose tolerance`` () =
    use a = torch.tensor([| 1.0f; nanf |])
    use b = torch.tensor([| 1.0f; 2.0f |])
    (ParityRunner.Compare("x", a, b, Tolerance(1e9, 1e9))).Pass |> should be False

[<Fact>]
let ``the v2.0.0 fixtures that share weights find them in weights_from`` () =
    use f = Fixture.Load(fixture (Path.Combine("v2.0.0", "tiled.safetensors")))
    let w = f.Weights "unet"
    w.Count |> should be (greaterThan 100)

/// The runner's one-line summary quotes the worst max_rel of the outputs judged relatively (or exactly); outputs with an
/// absolute band only (the structurally zero gradients of training/README.md, ~1e-9 noise on both sides) are reported
/// apart, because their max_rel divides noise by noise (train_stage2_v: 1.88 on grad.time_embed.0, max_abs 4.2e-10).
[<Fact>]
let ``the worst max_rel of a case separates absolute-band outputs from the rest`` () =
    let o name rel (tol: Tolerance) = OutputReport(name, rel * 1e-3, rel, tol, true)
    let r =
        CaseReport("f.safetensors", "c", CaseStatus.Pass,
                   [ o "model_output" 2e-6 (Tolerance(1e-5, 0.0))
                     o "grad.time_embed.0.bias" 1.88 (Tolerance(0.0, 1e-8))
                     o "draws left unused" 0.0 (Tolerance(0.0, 0.0))
                     OutputReport("skipped", nan, nan, Tolerance(1e-4, 0.0), true, "not compared") ], null, System.TimeSpan.Zero)
    r.WorstRel |> should equal 1.88
    r.WorstRelBanded |> should equal 2e-6
    r.WorstRelAbsoluteBand |> should equal 1.88
    let none = CaseReport("f", "c", CaseStatus.Pass, [ o "exact" 0.0 (Tolerance(0.0, 0.0)) ], null, System.TimeSpan.Zero)
    none.WorstRelBanded |> should equal 0.0
    System.Double.IsNaN none.WorstRelAbsoluteBand |> should be True
