/// Stage-1 training degradations (paper §4.1; diffbir/dataset/degradation.py + codeformer.py): blur kernels, the
/// first-order path blur → downsample → noise → JPEG → resize back, and the random source that drives it.
module DiffBIR.Lab.Tests.DegradationTests

open System
open Xunit
open FsUnit.Xunit
open TorchSharp
open DiffBIR.Lab.Degradation
open DiffBIR.Lab.IO
open DiffBIR.Lab.Tests.TestSupport

let private maxAbs (a: torch.Tensor) (b: torch.Tensor) = (a - b).abs().max().ToDouble()
let private sum (k: torch.Tensor) = k.sum().ToDouble()
/// max |k − k'| for k' = k transposed / flipped along the given dimensions
let private asym (k: torch.Tensor) (dims: int64[]) = maxAbs k (k.flip(dims))
let private transposeAsym (k: torch.Tensor) = maxAbs k (k.t())
let private mean (t: torch.Tensor) = t.mean().ToDouble()

// ---------------------------------------------------------------- parity

[<Fact>]
let ``every kernel and both first-order samples of degradation.py / codeformer.py match the official ones`` () =
    let r = assertParity "degradation_kernels.safetensors"
    // 44 official outputs + the two float64 references, nothing skipped
    r.Outputs.Count |> should equal 46
    r.Outputs |> Seq.exists (fun o -> o.Skipped) |> should be False
    let worst prefix = r.Outputs |> Seq.filter (fun o -> o.Name.StartsWith(prefix: string)) |> Seq.map (fun o -> o.MaxAbs) |> Seq.max
    worst "sinc" |> should be (lessThan 1e-15)
    worst "ref64" |> should be (lessThan 1e-13)

// ---------------------------------------------------------------- kernels

[<Fact>]
let ``every kernel family sums to 1`` () =
    let kernels =
        [ BlurKernels.BivariateGaussian(21, 2.0, 2.0, 0.0, true)
          BlurKernels.BivariateGaussian(41, 0.3, 6.0, 1.0, false)
          BlurKernels.BivariateGeneralizedGaussian(21, 1.0, 3.0, 0.7, 2.0, false)
          BlurKernels.BivariatePlateau(13, 2.2, 0.9, -2.5, 0.6, false)
          BlurKernels.CircularLowpass(Math.PI / 3.0, 7)
          BlurKernels.CircularLowpass(1.2, 11, 21) ]
    for k in kernels do
        k.dtype |> should equal torch.ScalarType.Float64
        sum k |> should (equalWithin 1e-14) 1.0

[<Fact>]
let ``isotropic kernels and the sinc are symmetric under flips and transposition`` () =
    for k in [ BlurKernels.BivariateGaussian(21, 2.0, 9.0, 1.3, true)   // isotropic: σy and θ ignored
               BlurKernels.BivariateGeneralizedGaussian(11, 2.5, 2.5, 0.0, 4.0, true)
               BlurKernels.BivariatePlateau(21, 1.0, 1.0, 0.0, 2.5, true)
               BlurKernels.CircularLowpass(2.0, 13) ] do
        asym k [| 0L |] |> should be (lessThan 1e-17)
        asym k [| 1L |] |> should be (lessThan 1e-17)
        transposeAsym k |> should be (lessThan 1e-17)

[<Fact>]
let ``anisotropic kernels are point-symmetric; with theta = 0 the axes are the mirror lines`` () =
    let rotated = BlurKernels.BivariateGaussian(21, 2.5, 0.8, Math.PI / 4.0, false)
    asym rotated [| 0L; 1L |] |> should be (lessThan 1e-17)
    asym rotated [| 0L |] |> should be (greaterThan 1e-3)
    // θ = π/4 puts the long axis on the diagonal: the kernel is symmetric under transposition
    transposeAsym rotated |> should be (lessThan 1e-15)
    let axisAligned = BlurKernels.BivariateGaussian(21, 1.0, 3.0, 0.0, false)
    asym axisAligned [| 0L |] |> should be (lessThan 1e-17)
    asym axisAligned [| 1L |] |> should be (lessThan 1e-17)
    // σy = 3 > σx = 1: wider along rows (y) than along columns (x)
    let centre = axisAligned.[10L, 10L].ToDouble()
    axisAligned.[13L, 10L].ToDouble() / centre |> should be (greaterThan (axisAligned.[10L, 13L].ToDouble() / centre))

[<Fact>]
let ``sigma 0.1 is numerically a delta: 1.9e-22 next to the centre`` () =
    let k = BlurKernels.BivariateGaussian(41, 0.1, 0.1, 0.0, true)
    k.[20L, 20L].ToDouble() |> should (equalWithin 1e-15) 1.0
    k.[20L, 21L].ToDouble() |> should (equalWithin 1e-23) (Math.Exp -50.0)

[<Fact>]
let ``Bessel J1 is the Cephes one: known values, zeros, odd, x/2 near 0`` () =
    Bessel.J1 1.0 |> should (equalWithin 1e-16) 0.44005058574493355
    Bessel.J1 10.0 |> should (equalWithin 1e-16) 0.04347274616886144
    Bessel.J1 -1.0 |> should equal (-(Bessel.J1 1.0))
    Bessel.J1 0.0 |> should equal 0.0
    // small x: J1(x) = x/2 − x³/16 + x⁵/384 − …
    let x = 1e-3
    Bessel.J1 x |> should (equalWithin 1e-19) (x / 2.0 - x ** 3.0 / 16.0 + x ** 5.0 / 384.0)
    Bessel.J1 1e-300 |> should (equalWithin 1e-315) 5e-301
    // first three zeros j₁,₁ j₁,₂ j₁,₃ (the first two are built into the rational form; the third is in the asymptotic branch)
    for z in [ 3.8317059702075125; 7.0155866698156188; 10.173468135062722 ] do
        abs (Bessel.J1 z) |> should be (lessThan 1e-15)

[<Fact>]
let ``the sinc kernel is zero-padded symmetrically to pad_to, and not at all when pad_to <= K`` () =
    let small = BlurKernels.CircularLowpass(Math.PI / 2.0, 9)
    let padded = BlurKernels.CircularLowpass(Math.PI / 2.0, 9, 21)
    padded.shape |> should equal [| 21L; 21L |]
    let inner = padded.[torch.TensorIndex.Slice(6L, 15L), torch.TensorIndex.Slice(6L, 15L)]
    maxAbs inner small |> should equal 0.0
    // 6 rows / columns of exact zeros on every side
    maxAbs padded (torch.nn.functional.pad(small, [| 6L; 6L; 6L; 6L |])) |> should equal 0.0
    BlurKernels.CircularLowpass(Math.PI / 2.0, 9, 9).shape |> should equal [| 9L; 9L |]
    BlurKernels.CircularLowpass(Math.PI / 2.0, 9, 5).shape |> should equal [| 9L; 9L |]
    // centre = ω²/(4π) before normalisation
    let raw = Math.PI / 2.0 * Math.PI / 2.0 / (4.0 * Math.PI)
    let ring = Math.PI / 2.0 * Bessel.J1(Math.PI / 2.0) / (2.0 * Math.PI)
    small.[4L, 4L].ToDouble() / small.[4L, 5L].ToDouble() |> should (equalWithin 1e-14) (raw / ring)

[<Fact>]
let ``random_mixed_kernels replays scripted draws in the official order`` () =
    let rng = ScriptedDegradationRandom([ 1.0; 5.0; 0.5 ], [ 1 ])
    let d = BlurKernels.RandomMixed([| BlurKernelType.Iso; BlurKernelType.Aniso |], [| 0.5; 0.5 |], rng, 41, ValueRange(0.1, 12.0), ValueRange(0.1, 12.0))
    d.Type |> should equal BlurKernelType.Aniso
    (d.SigmaX, d.SigmaY, d.Rotation) |> should equal (1.0, 5.0, 0.5)
    maxAbs d.Kernel (BlurKernels.BivariateGaussian(41, 1.0, 5.0, 0.5, false)) |> should be (lessThan 1e-16)
    rng.RemainingUniforms |> should equal 0
    // a draw outside its range is refused
    let bad = ScriptedDegradationRandom([ 13.0 ], [ 0 ])
    (fun () -> BlurKernels.RandomMixed([| BlurKernelType.Iso |], [| 1.0 |], bad, 41, ValueRange(0.1, 12.0)) |> ignore)
    |> should throw typeof<InvalidOperationException>

// ---------------------------------------------------------------- first-order path

[<Fact>]
let ``filter2D is a correlation with reflect-101 borders`` () =
    let img = torch.arange(0.0, 5.0, 1.0, dtype = torch.ScalarType.Float64).view(1, 1, 5).expand(3, 4, 5).contiguous()
    // 3×3 kernel with its 1 on the left of the centre: out(x) = in(x − 1); at x = 0 reflect-101 reads in(1)
    let k = torch.zeros(3, 3, dtype = torch.ScalarType.Float64)
    k.[1L, 0L] <- torch.tensor 1.0
    let out = FirstOrderDegradation.Filter2D(img, k)
    [ for x in 0L .. 4L -> out.[0L, 2L, x].ToDouble() ] |> should equal [ 1.0; 0.0; 1.0; 2.0; 3.0 ]

[<Fact>]
let ``downsampled size is int(w // r) with Python's float floor division`` () =
    FirstOrderDegradation.PyFloorDiv(64.0, 4.0) |> should equal 16.0
    FirstOrderDegradation.PyFloorDiv(64.0, 3.3) |> should equal 19.0
    FirstOrderDegradation.PyFloorDiv(1.0, 0.1) |> should equal 9.0   // not 10: fmod-based, as CPython

[<Fact>]
let ``the defaults are train_stage1.yaml's`` () =
    let d = FirstOrderDegradation.TrainStage1
    d.BlurKernelSize |> should equal 41
    d.KernelList |> List.ofSeq |> should equal [ BlurKernelType.Iso; BlurKernelType.Aniso ]
    d.KernelProb |> List.ofSeq |> should equal [ 0.5; 0.5 ]
    d.BlurSigma |> should equal (ValueRange(0.1, 12.0))
    d.DownsampleRange |> should equal (ValueRange(1.0, 12.0))
    d.NoiseRange |> should equal (ValueRange(0.0, 15.0))
    d.JpegRange |> should equal (ValueRange(30.0, 100.0))

[<Fact>]
let ``noise with delta 0 is the identity up to the clip to 0..1`` () =
    let img = torch.linspace(-0.2, 1.2, 3L * 8L * 8L).view(3L, 8L, 8L)
    let out = FirstOrderDegradation.AddGaussianNoise(img, 0.0, SeededDegradationRandom(7UL))
    maxAbs out (img.clamp(0.0.ToScalar(), 1.0.ToScalar())) |> should equal 0.0

[<Fact>]
let ``noise has standard deviation delta / 255 and is reproducible from the seed`` () =
    let grey = torch.full([| 1L; 3L; 64L; 64L |], 0.5.ToScalar())
    let a = FirstOrderDegradation.AddGaussianNoise(grey, 10.0, SeededDegradationRandom(1UL))
    let b = FirstOrderDegradation.AddGaussianNoise(grey, 10.0, SeededDegradationRandom(1UL))
    let c = FirstOrderDegradation.AddGaussianNoise(grey, 10.0, SeededDegradationRandom(2UL))
    maxAbs a b |> should equal 0.0
    maxAbs a c |> should be (greaterThan 0.01)
    (a - grey).std().ToDouble() * 255.0 |> should (equalWithin 0.3) 10.0
    mean (a - grey) * 255.0 |> should (equalWithin 0.3) 0.0

[<Fact>]
let ``a lower JPEG quality gives a larger error`` () =
    let img = TestImages.Card(64, 64)
    let err q = (FirstOrderDegradation.JpegCompress(img, q) - img).abs().mean().ToDouble()
    let e30, e60, e95 = err 30, err 60, err 95
    e30 |> should be (greaterThan e60)
    e60 |> should be (greaterThan e95)
    e95 |> should be (greaterThan 0.0)
    let out = FirstOrderDegradation.JpegCompress(img, 50)
    out.shape |> should equal img.shape
    out.dtype |> should equal img.dtype
    // decoded 8-bit values / 255
    maxAbs (out * 255.0f) ((out * 255.0f).round()) |> should be (lessThan 1e-4)

[<Fact>]
let ``degrade draws within train_stage1's ranges, keeps the size, and is deterministic for a seed`` () =
    let img = TestImages.Card(96, 80)
    let d = FirstOrderDegradation.TrainStage1
    let run seed = d.Degrade(img, SeededDegradationRandom(seed))
    use a = run 11UL
    use b = run 11UL
    use c = run 12UL
    let p = a.Parameters
    a.Lq.shape |> should equal img.shape
    a.Lq.dtype |> should equal img.dtype
    maxAbs a.Lq b.Lq |> should equal 0.0
    (p.Blur.Type, p.Blur.SigmaX, p.Blur.SigmaY, p.Blur.Rotation, p.Scale, p.NoiseSigma, p.JpegQuality)
    |> should equal (b.Parameters.Blur.Type, b.Parameters.Blur.SigmaX, b.Parameters.Blur.SigmaY, b.Parameters.Blur.Rotation, b.Parameters.Scale, b.Parameters.NoiseSigma, b.Parameters.JpegQuality)
    maxAbs p.Blur.Kernel b.Parameters.Blur.Kernel |> should equal 0.0
    maxAbs a.Lq c.Lq |> should be (greaterThan 0.0)
    p.Blur.SigmaX |> should be (inRange 0.1 12.0)
    p.Scale |> should be (inRange 1.0 12.0)
    (p.SmallHeight, p.SmallWidth) |> should equal (int (FirstOrderDegradation.PyFloorDiv(96.0, p.Scale)), int (FirstOrderDegradation.PyFloorDiv(80.0, p.Scale)))
    a.Small.shape |> should equal [| 1L; 3L; int64 p.SmallHeight; int64 p.SmallWidth |]
    p.NoiseSigma.Value |> should be (inRange 0.0 15.0)
    p.JpegQuality.Value |> should be (inRange 30 99)
    // noise and JPEG clip, and bilinear upsampling stays within [0, 1]
    a.Lq.min().ToDouble() |> should be (greaterThanOrEqualTo 0.0)
    a.Lq.max().ToDouble() |> should be (lessThanOrEqualTo 1.0)

[<Fact>]
let ``over many seeds both kernel types and the whole sigma range are drawn`` () =
    let img = torch.full([| 3L; 24L; 24L |], 0.5.ToScalar())
    let d = FirstOrderDegradation(DownsampleRange = ValueRange(1.0, 2.0), NoiseRange = null, JpegRange = null)
    let ps = [ for s in 1UL .. 40UL -> (use r = d.Degrade(img, SeededDegradationRandom(s)) in r.Parameters) ]
    ps |> List.map (fun p -> p.Blur.Type) |> List.distinct |> List.length |> should equal 2
    ps |> List.filter (fun p -> p.Blur.Type = BlurKernelType.Iso) |> List.forall (fun p -> p.Blur.SigmaY = p.Blur.SigmaX && p.Blur.Rotation = 0.0) |> should be True
    ps |> List.map (fun p -> p.Blur.SigmaX) |> List.max |> should be (greaterThan 6.0)
    ps |> List.forall (fun p -> not p.NoiseSigma.HasValue && not p.JpegQuality.HasValue) |> should be True
