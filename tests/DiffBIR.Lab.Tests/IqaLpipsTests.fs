/// LPIPS as pyiqa computes the metrics lpips (AlexNet) and lpips-vgg (VGG16): golden fixtures, full-size schemas, and
/// what a user meets (batches, odd sizes, gray images, inputs out of range).
module DiffBIR.Lab.Tests.IqaLpipsTests

open System
open System.Text.Json.Nodes
open Xunit
open FsUnit.Xunit
open TorchSharp
open DiffBIR.Lab.Checkpoints
open DiffBIR.Lab.Parity
open DiffBIR.Lab.Parity.Cases
open DiffBIR.Lab.Metrics.Lpips
open DiffBIR.Lab.Tests.TestSupport

let private alexFile = "iqa/lpips_alex.safetensors"
let private vggFile = "iqa/lpips_vgg.safetensors"

let private maxAbs (a: torch.Tensor) (b: torch.Tensor) =
    (a.to_type(torch.ScalarType.Float64) - b.to_type(torch.ScalarType.Float64)).abs().max().item<float>()

/// Rows top .. top+h-1, columns left .. left+w-1.
let private crop (t: torch.Tensor) (top: int64) (h: int64) (left: int64) (w: int64) = t.narrow(2L, top, h).narrow(3L, left, w)

// ---- parity with pyiqa ------------------------------------------------------------------------------------------

[<Fact>]
let ``lpips (AlexNet): score and every intermediate match pyiqa's LPIPS`` () =
    let r = assertParity alexFile
    r.Outputs.Count |> should equal 56

[<Fact>]
let ``lpips-vgg: the counter-generated VGG16 trunk matches the fixture's checksums and the score matches pyiqa`` () =
    let r = assertParity vggFile
    r.Outputs |> Seq.filter (fun o -> o.Name.StartsWith "hashinit") |> Seq.length |> should equal (26 * 5)
    r.Outputs |> Seq.exists (fun o -> o.Name = "b.score") |> should be True

/// Run in float64, our code must land exactly where pyiqa's float64 copy landed: |ours₆₄ − fixture₃₂| equals the
/// fixture's own float32-vs-float64 max_abs for every output (within 2 %; measured ≤ 0.5 %). This pins the maths far
/// below the float32 tolerances of the parity case.
[<Theory>]
[<InlineData("iqa/lpips_alex.safetensors")>]
[<InlineData("iqa/lpips_vgg.safetensors")>]
let ``in float64 the port reproduces the fixture's float32-vs-float64 error for every output`` (file: string) =
    use scope = torch.NewDisposeScope()
    use f = Fixture.Load(fixture file)
    let case : IqaLpipsCase = if file.Contains "vgg" then IqaLpipsVggCase() else IqaLpipsAlexCase()
    use m = case.LoadModel f
    m.``to``(torch.ScalarType.Float64) |> ignore
    let reference = f.MetaJson("tolerance").["f32_vs_f64"].AsObject()
    let mutable compared = 0
    use _ = torch.no_grad()
    for run in [ "a"; "b" ] do
        let t = m.Trace(f.In($"{run}.target").to_type(torch.ScalarType.Float64), f.In($"{run}.ref").to_type(torch.ScalarType.Float64))
        for struct (name, value) in IqaLpipsCase.Named t do
            let key = $"{run}.{name}"
            if f.Tensors.ContainsKey("out." + key) then
                let want = float (reference.[key].["max_abs"])
                let got = maxAbs value (f.Out key)
                if want > 0.0 then
                    (got / want) |> should (equalWithin 0.02) 1.0
                    compared <- compared + 1
    compared |> should be (greaterThanOrEqualTo 24)

/// A comparison that cannot fail proves nothing: a 1 % error in one head, or in one input image, must fail.
type private Perturbed(inner: IParityCase, perturb: Fixture -> unit) =
    interface IParityCase with
        member _.Case = inner.Case
        member _.Description = "perturbed"
        member _.DefaultTolerance = inner.DefaultTolerance
        member _.Run f =
            perturb f
            inner.Run f

let private scale (f: Fixture) (key: string) (factor: float) = f.Tensors.[key] <- f.Tensors.[key].mul(torch.tensor(factor).to_type(torch.ScalarType.Float32))

[<Fact>]
let ``a head weight off by 1 % or a target image dimmed by 1 % fails the comparison`` () =
    let wrongHead =
        Perturbed(IqaLpipsAlexCase(), fun f ->
            // lin2 and lins.2 are the same module: the loader copies both keys, so both are changed.
            scale f "weights.lin2.model.1.weight" 1.01
            scale f "weights.lins.2.model.1.weight" 1.01)
    let r = ParityRunner([ wrongHead :> IParityCase ]).RunFile(fixture alexFile)
    r.Status |> should equal CaseStatus.Fail
    let byName = r.Outputs |> Seq.map (fun o -> o.Name, o) |> Map.ofSeq
    byName.["a.lin.2"].Pass |> should be False
    byName.["a.res.2"].Pass |> should be False
    byName.["a.score"].Pass |> should be False
    byName.["a.lin.0"].Pass |> should be True     // the other heads are untouched
    byName.["a.feat0.2"].Pass |> should be True   // and so is the trunk
    let wrongInput = Perturbed(IqaLpipsAlexCase(), fun f -> scale f "in.b.target" 0.99)
    let r2 = ParityRunner([ wrongInput :> IParityCase ]).RunFile(fixture alexFile)
    r2.Status |> should equal CaseStatus.Fail
    let byName2 = r2.Outputs |> Seq.map (fun o -> o.Name, o) |> Map.ofSeq
    byName2.["b.score"].Pass |> should be False
    byName2.["b.feat1.0"].Pass |> should be False
    byName2.["b.feat0.0"].Pass |> should be True  // the reference image is untouched
    byName2.["a.score"].Pass |> should be True

// ---- full-size schemas ------------------------------------------------------------------------------------------

let private schemaCheck (name: string) (config: LpipsConfig) =
    let schema = Schema.Load(fixture $"iqa/schema/{name}.json")
    let struct (report, keys, values) = SchemaCase.Measure((fun () -> new LpipsMetric(config) :> torch.nn.Module), schema)
    let summary = JsonNode.Parse(IO.File.ReadAllText(fixture "iqa/schema/summary.json")).["summary"].[name]
    report.Missing |> should be Empty
    report.Unexpected |> should be Empty
    report.ShapeMismatches |> should be Empty
    keys |> should equal (int64 summary.["keys"])
    values |> should equal (int64 summary.["numel"])

[<Fact>]
let ``full-size lpips (AlexNet) has exactly pyiqa's 22 keys and shapes, lins.k duplicating link, built on the meta device`` () =
    schemaCheck "lpips_alex" LpipsConfig.Alex
    assertParity "iqa/schema/lpips_alex.json" |> ignore

[<Fact>]
let ``full-size lpips-vgg has exactly pyiqa's 38 keys and shapes, built on the meta device`` () =
    schemaCheck "lpips_vgg" LpipsConfig.Vgg
    assertParity "iqa/schema/lpips_vgg.json" |> ignore

// ---- what a user meets ------------------------------------------------------------------------------------------

[<Fact>]
let ``a batch of two scores each pair as alone, and its first row is the fixture's score`` () =
    use scope = torch.NewDisposeScope()
    use f = Fixture.Load(fixture alexFile)
    use m = IqaLpipsAlexCase().LoadModel f
    let x1, r1 = f.In "a.target", f.In "a.ref"
    // A second, different pair of the same size: the first one mirrored.
    let x2, r2 = x1.flip(3L), r1.flip(3L)
    let batch = m.Score(torch.cat([| x1; x2 |], 0L), torch.cat([| r1; r2 |], 0L))
    batch.shape |> should equal [| 2L; 1L |]
    let s1 = m.Score(x1, r1)
    let s2 = m.Score(x2, r2)
    // Another batch size may take another convolution path: float32 rounding only (measured 4e-7 of the score).
    let tol = 1e-6 * abs (f.Out("a.score").item<float32>() |> float)
    maxAbs (batch.narrow(0L, 0L, 1L)) s1 |> should be (lessThanOrEqualTo tol)
    maxAbs (batch.narrow(0L, 1L, 1L)) s2 |> should be (lessThanOrEqualTo tol)
    maxAbs (batch.narrow(0L, 0L, 1L)) (f.Out "a.score") |> should be (lessThanOrEqualTo tol)
    // A single reference broadcasts over a batch of targets, as in the official code.
    let broadcast = m.Score(torch.cat([| x1; x1.flip(2L) |], 0L), r1)
    maxAbs (broadcast.narrow(0L, 0L, 1L)) s1 |> should be (lessThanOrEqualTo tol)

[<Fact>]
let ``odd sizes down to the trunk's minimum work (31 px AlexNet, 16 px VGG16); one pixel less is refused`` () =
    use scope = torch.NewDisposeScope()
    use f = Fixture.Load(fixture alexFile)
    use alex = IqaLpipsAlexCase().LoadModel f
    let x, r = f.In "b.target", f.In "b.ref"    // 80 × 56
    let s = alex.Score(crop x 3 37 5 31, crop r 3 37 5 31)   // 37 × 31
    s.shape |> should equal [| 1L; 1L |]
    Double.IsFinite(s.item<float32>() |> float) |> should be True
    // Identical images are at distance exactly 0.
    alex.Score(crop x 0 31 0 33, crop x 0 31 0 33).item<float32>() |> should equal 0.0f
    (fun () -> alex.Score(crop x 0 30 0 40, crop r 0 30 0 40) |> ignore) |> should throw typeof<ArgumentException>
    use vgg = new LpipsMetric(LpipsConfig.Vgg)
    vgg.Score(crop x 0 16 0 17, crop r 0 16 0 17).shape |> should equal [| 1L; 1L |]
    (fun () -> vgg.Score(crop x 0 15 0 17, crop r 0 15 0 17) |> ignore) |> should throw typeof<ArgumentException>

[<Fact>]
let ``inputs outside [0, 1] are refused as pyiqa asserts; gray images broadcast over RGB like the official ScalingLayer`` () =
    use scope = torch.NewDisposeScope()
    use f = Fixture.Load(fixture alexFile)
    use m = IqaLpipsAlexCase().LoadModel f
    let x, r = f.In "a.target", f.In "a.ref"
    (fun () -> m.Score(x + 0.5, r) |> ignore) |> should throw typeof<ArgumentOutOfRangeException>
    (fun () -> m.Score(x, r - 0.5) |> ignore) |> should throw typeof<ArgumentOutOfRangeException>
    (fun () -> m.Score(x.squeeze(0L), r.squeeze(0L)) |> ignore) |> should throw typeof<ArgumentException>
    (fun () -> m.Score(x, r.narrow(2L, 1L, 47L)) |> ignore) |> should throw typeof<ArgumentException>
    let gx, gr = x.mean([| 1L |], keepdim = true), r.mean([| 1L |], keepdim = true)
    maxAbs (m.Score(gx, gr)) (m.Score(gx.expand(1L, 3L, -1L, -1L), gr.expand(1L, 3L, -1L, -1L))) |> should equal 0.0

[<Fact>]
let ``config: the fixture's metric_opts and pyiqa's metric names give the released architectures; unported options are refused`` () =
    LpipsConfig.FromJson(JsonNode.Parse """{"type": "LPIPS", "net": "vgg", "version": "0.1", "pretrained": false}""")
    |> should equal LpipsConfig.Vgg
    LpipsConfig.ForMetric "lpips" |> should equal LpipsConfig.Alex
    LpipsConfig.ForMetric "lpips-vgg" |> should equal LpipsConfig.Vgg
    (fun () -> LpipsConfig.FromJson(JsonNode.Parse """{"net": "alex", "spatial": true}""") |> ignore) |> should throw typeof<ArgumentException>
    (fun () -> LpipsConfig.FromJson(JsonNode.Parse """{"net": "squeeze"}""") |> ignore) |> should throw typeof<ArgumentException>
    (fun () -> LpipsConfig.ForMetric "lpips+" |> ignore) |> should throw typeof<ArgumentException>
