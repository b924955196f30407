/// NIQE (Mittal et al. 2013) as the lab's weight-free quality measure `niqe-lab`. No pyiqa/MATLAB fixture exists for
/// it, so each part is checked against an independent truth: the AGGD fit recovers the shape of samples drawn from
/// known distributions, MATLAB's antialiased bicubic halving reproduces a linear ramp, the MSCN of a flat image is 0,
/// and a model fitted on sharp images scores blurred and noisy copies of held-out images as worse.
module DiffBIR.Lab.Tests.NiqeTests

open System
open System.IO
open Xunit
open FsUnit.Xunit
open TorchSharp
open DiffBIR.Lab.Metrics
open DiffBIR.Lab.Metrics.Niqe
open DiffBIR.Lab.Tests.TestSupport

/// Samples of an AGGD with α = 2: a half-normal of σ_l on the left with probability σ_l/(σ_l + σ_r), of σ_r on the right
/// (a Gaussian when equal). Then β_l = σ_l√2, β_r = σ_r√2.
let private splitNormal (seed: int) (n: int) (sl: float) (sr: float) =
    let rnd = Random seed
    Array.init n (fun _ ->
        let u1 = 1.0 - rnd.NextDouble()
        let z = abs (sqrt (-2.0 * log u1) * cos (2.0 * Math.PI * rnd.NextDouble()))
        if rnd.NextDouble() < sl / (sl + sr) then -z * sl else z * sr)

let private laplace (seed: int) (n: int) (b: float) =
    let rnd = Random seed
    Array.init n (fun _ ->
        let u = rnd.NextDouble() - 0.5
        -b * float (sign u) * log (1.0 - 2.0 * abs u))

[<Fact>]
let ``the AGGD fit recovers the shape and scales of known distributions`` () =
    let a, l, r = Aggd.Fit(ReadOnlySpan(splitNormal 1 200000 1.0 1.0)).ToTuple()
    a |> should (equalWithin 0.05) 2.0
    l |> should (equalWithin 0.02) (sqrt 2.0)       // β = σ·√(Γ(1/α)/Γ(3/α)) = σ√2 for α = 2
    r |> should (equalWithin 0.02) (sqrt 2.0)
    let a, l, r = Aggd.Fit(ReadOnlySpan(splitNormal 2 200000 1.0 2.0)).ToTuple()
    a |> should (equalWithin 0.05) 2.0
    l |> should (equalWithin 0.03) (sqrt 2.0)
    r |> should (equalWithin 0.06) (2.0 * sqrt 2.0)
    let a, l, r = Aggd.Fit(ReadOnlySpan(laplace 3 200000 0.7)).ToTuple()
    a |> should (equalWithin 0.03) 1.0            // Laplace = GGD with α = 1, β = b
    l |> should (equalWithin 0.02) 0.7
    r |> should (equalWithin 0.02) 0.7
    let a, _, _ = Aggd.Fit(ReadOnlySpan(Array.create 10 1.0)).ToTuple()
    Double.IsNaN a |> should be True              // no negative samples: undefined, as MATLAB's NaN

[<Fact>]
let ``log-gamma matches known values`` () =
    Aggd.LogGamma 5.0 |> should (equalWithin 1e-13) (log 24.0)
    Aggd.LogGamma 0.5 |> should (equalWithin 1e-13) (0.5 * log Math.PI)
    Aggd.LogGamma 0.2 |> should (equalWithin 1e-12) (log 4.5908437119988030532)

[<Fact>]
let ``MATLAB's antialiased bicubic halving reproduces a ramp and a constant`` () =
    let h, w = 40, 26
    let ramp = Array2D.init h w (fun i j -> float i + 10.0 * float j)
    let half = MatlabResize.HalfBicubic ramp
    half.GetLength 0 |> should equal 20
    half.GetLength 1 |> should equal 13
    // away from the symmetric borders, output o sits at input 2o + 0.5 (MATLAB's pixel-centre convention)
    for o in 3 .. 16 do
        for p in 3 .. 9 do
            half.[o, p] |> should (equalWithin 1e-9) ((2.0 * float o + 0.5) + 10.0 * (2.0 * float p + 0.5))
    let flat = MatlabResize.HalfBicubic(Array2D.create 9 7 42.0)
    flat.GetLength 0 |> should equal 5
    flat |> Seq.cast<float> |> Seq.iter (fun v -> v |> should (equalWithin 1e-12) 42.0)

[<Fact>]
let ``the MSCN of a flat image is zero and of a step is antisymmetric`` () =
    let m, s = Niqe.Mscn(Array2D.create 12 12 100.0).ToTuple()
    m |> Seq.cast<float> |> Seq.iter (fun v -> v |> should (equalWithin 1e-12) 0.0)
    s |> Seq.cast<float> |> Seq.iter (fun v -> v |> should (equalWithin 1e-4) 0.0) // √|E[x²] − E[x]²| of 100s: rounding only
    let step = Array2D.init 16 16 (fun _ j -> if j < 8 then 50.0 else 150.0)
    let m, _ = Niqe.Mscn(step).ToTuple()
    for i in 0 .. 15 do
        m.[i, 7] |> should (equalWithin 1e-9) (-m.[i, 8])
        m.[i, 7] |> should be (lessThan -0.5)

/// A seeded "dead leaves" image (grey 0..255): discs of random grey level with power-law radii (density ∝ r⁻³,
/// 1.5 … 48 px) dropped one over another, lightly antialiased — an occlusion model with the scale-invariant edge
/// statistics of natural images (Lee, Mumford, Huang 2001), which is what NIQE's features model.
let private synthetic (seed: int) (size: int) =
    let rnd = Random seed
    let img = Array2D.create size size (rnd.NextDouble() * 255.0)
    let rmin, rmax = 1.5, 48.0
    for _ in 1 .. 1500 do
        // inverse CDF of p(r) ∝ r⁻³ on [rmin, rmax]
        let u = rnd.NextDouble()
        let r = 1.0 / sqrt (1.0 / (rmin * rmin) - u * (1.0 / (rmin * rmin) - 1.0 / (rmax * rmax)))
        let cy, cx, g = rnd.NextDouble() * float size, rnd.NextDouble() * float size, rnd.NextDouble() * 255.0
        for i in max 0 (int (cy - r)) .. min (size - 1) (int (cy + r)) do
            for j in max 0 (int (cx - r)) .. min (size - 1) (int (cx + r)) do
                if (float i - cy) ** 2.0 + (float j - cx) ** 2.0 <= r * r then img.[i, j] <- g
    img

/// Separable Gaussian blur (σ, radius 3σ, replicate borders), written here independently of the library.
let private blur (sigma: float) (img: float[,]) =
    let r = int (ceil (3.0 * sigma))
    let k = Array.init (2 * r + 1) (fun t -> exp (-(float (t - r) ** 2.0) / (2.0 * sigma * sigma)))
    let ks = Array.sum k
    let k = k |> Array.map (fun v -> v / ks)
    let h, w = img.GetLength 0, img.GetLength 1
    let pass (src: float[,]) horizontal =
        Array2D.init h w (fun i j ->
            let mutable s = 0.0
            for t in -r .. r do
                let ii, jj = (if horizontal then i, Math.Clamp(j + t, 0, w - 1) else Math.Clamp(i + t, 0, h - 1), j)
                s <- s + k.[t + r] * src.[ii, jj]
            s)
    Array2D.map (fun (v: float) -> Math.Round v) (pass (pass img true) false)

let private blurRaw sigma img = blur sigma img

let private noisy (seed: int) (sigma: float) (img: float[,]) =
    let rnd = Random seed
    img |> Array2D.map (fun v ->
        let z = sqrt (-2.0 * log (1.0 - rnd.NextDouble())) * cos (2.0 * Math.PI * rnd.NextDouble())
        Math.Round(Math.Clamp(v + sigma * z, 0.0, 255.0)))

let private model = lazy (Niqe.Fit([ for s in 0 .. 23 -> blurRaw 0.6 (synthetic s 128) ], 32, "dead-leaves test images"))

[<Fact>]
let ``a model fitted on sharp images scores blurred and noisy copies as worse`` () =
    let m = model.Force()
    m.Blocks |> should be (greaterThan 36)
    m.Images |> should equal 24
    for s in 100 .. 103 do
        let clean = blurRaw 0.6 (synthetic s 128)
        let q = Niqe.Score(clean, m)
        let qBlur = Niqe.Score(blur 2.0 clean, m)
        let qNoise = Niqe.Score(noisy s 20.0 clean, m)
        Double.IsFinite q |> should be True
        qBlur |> should be (greaterThan (q + 1.0))
        qNoise |> should be (greaterThan (q + 1.0))
    // more blur, worse score
    let c = blurRaw 0.6 (synthetic 104 128)
    Niqe.Score(blur 3.0 c, m) |> should be (greaterThan (Niqe.Score(blur 1.0 c, m)))

[<Fact>]
let ``the model file round-trips and the registry scores with it`` () =
    use dir = new TempDir()
    let path = dir.File NiqeLab.ModelFile
    model.Force().Save path
    let back = NiqeModel.Load path
    back.BlockSize |> should equal 32
    back.Mu |> should equal (model.Force().Mu)
    (Metric.Describe "niqe-lab").HigherIsBetter |> should be False
    (Metric.Availability("niqe-lab", dir.Path)).Available |> should be True
    use metric = Metric.Get("niqe-lab", dir.Path)
    let grey = synthetic 200 96 |> Array2D.map Math.Round
    let rgb = torch.tensor(grey |> Seq.cast<float> |> Seq.map (fun v -> byte v) |> Array.ofSeq).reshape(1L, 96L, 96L, 1L).expand(1L, 96L, 96L, 3L).contiguous()
    let viaRegistry = metric.Score(rgb)
    viaRegistry.[0] |> should (equalWithin 1e-9) (Niqe.Score(grey, back))
    // a safetensors file that is not a NIQE model is refused with its name
    let other = dir.File "other.safetensors"
    DiffBIR.Lab.Checkpoints.SafeTensors.Save(other, readOnlyDict [ "x", torch.zeros(3L) ], null)
    let e = Assert.ThrowsAny<exn>(fun () -> NiqeModel.Load other |> ignore)
    e.Message |> should haveSubstring "other.safetensors"

[<Fact>]
let ``weights fit-niqe fits a folder and refuses bad input with one line`` () =
    use dir = new TempDir()
    let hq = dir.File "hq"
    Directory.CreateDirectory hq |> ignore
    for s in 0 .. 5 do
        let g = synthetic (300 + s) 128
        let t = torch.tensor(g |> Seq.cast<float> |> Seq.map (fun v -> float32 (v / 255.0)) |> Array.ofSeq).reshape(1L, 1L, 128L, 128L).expand(1L, 3L, 128L, 128L).contiguous()
        DiffBIR.Lab.IO.ImageIO.Save(Path.Combine(hq, sprintf "%02d.png" s), t, DiffBIR.Lab.IO.Quantization.Round)
    let out = dir.File "m.safetensors"
    let code, text = CliTests.run [ "weights"; "fit-niqe"; "--hq"; hq; "-o"; out ]
    code |> should equal 0
    text |> should haveSubstring "sharp blocks of 6 images"
    (NiqeModel.Load out).BlockSize |> should equal 32
    let code, text = CliTests.run [ "weights"; "fit-niqe"; "--hq"; hq; "-o"; out; "--block"; "7" ]
    code |> should equal 2
    text |> should haveSubstring "--block"
    let code, text = CliTests.run [ "weights"; "fit-niqe"; "--hq"; dir.File "missing"; "-o"; out ]
    code |> should equal 2
    text |> should haveSubstring "missing"
    text |> should not' (haveSubstring "   at ")

[<Fact>]
let ``the committed niqe-lab model prefers held-out procedural HQ images to blurred and noisy copies`` () =
    use metric = Metric.Get("niqe-lab", Path.Combine(repoRoot, "weights"))
    let committed = NiqeModel.Load(Path.Combine(repoRoot, "weights", NiqeLab.ModelFile))
    let mutable better = 0
    for i in 0 .. 5 do
        use img = DiffBIR.Lab.Data.ProceduralImages.Generate(2026L, 1_000_000L + int64 i, 128)
        let grey = Niqe.GreyLevels img
        let q = Niqe.Score(grey, committed)
        let viaRegistry = metric.Score(img.unsqueeze 0L).[0]
        viaRegistry |> should (equalWithin 1e-9) q
        if Niqe.Score(blur 2.0 grey, committed) > q && Niqe.Score(noisy i 15.0 grey, committed) > q then
            better <- better + 1
    better |> should be (greaterThanOrEqualTo 5)
