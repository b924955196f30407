/// HTML views of images and tables for notebooks (no script or style from the network).
namespace DiffBIR.Lab.Interactive

open System
open System.Collections
open System.Globalization
open System.Net
open System.Text
open Microsoft.FSharp.Reflection
open TorchSharp
open DiffBIR.Lab.IO

/// One captioned image of a grid.
type Captioned = { Caption: string; Image: torch.Tensor }

/// Images side by side with their captions under each (a CSS grid: captions never misalign, long ones wrap).
type ImageGrid =
    { Items: Captioned list
      /// Images per row (0: all in one row).
      Columns: int
      /// Display width of each image in CSS pixels (small images are scaled up with crisp pixels).
      Width: int }

module Html =
    let encode (s: string) = WebUtility.HtmlEncode s

    /// The batch of images in a tensor as float [N, 3, H, W] in [0, 1]: uint8 NHWC / HWC, float NCHW / CHW in [0, 1];
    /// float in [−1, 1] (a VAE decode) is mapped to [0, 1]; one channel (a map) is shown grey. None for anything else.
    let asImages (t: torch.Tensor) : torch.Tensor option =
        use _ = torch.no_grad ()
        let rank = int (t.dim ())
        let rgb (x: torch.Tensor) = if x.shape.[1] = 1L then x.expand(-1L, 3L, -1L, -1L).contiguous () else x
        if t.dtype = torch.ScalarType.Byte && (rank = 3 || rank = 4) && (t.shape.[rank - 1] = 3L || t.shape.[rank - 1] = 1L) then
            let x = (if rank = 3 then t.unsqueeze 0L else t).permute(0L, 3L, 1L, 2L).to_type(torch.ScalarType.Float32) / 255.0
            Some(rgb x)
        elif t.is_floating_point () && (rank = 3 || rank = 4) && (t.shape.[rank - 3] = 3L || t.shape.[rank - 3] = 1L) && t.numel () > 0L then
            let x = (if rank = 3 then t.unsqueeze 0L else t).detach().cpu().to_type(torch.ScalarType.Float32)
            let lo, hi = x.min().item<float32> (), x.max().item<float32> ()
            if lo >= -1e-3f && hi <= 1.001f then Some(rgb (x.clamp((0.0).ToScalar(), (1.0).ToScalar())))
            elif lo >= -1.05f && hi <= 1.05f then Some(rgb (((x + 1.0) / 2.0).clamp((0.0).ToScalar(), (1.0).ToScalar())))
            else None
        else None

    /// A PNG data URI of one image [3, H, W] / [1, 3, H, W] in [0, 1].
    let dataUri (img: torch.Tensor) =
        "data:image/png;base64," + Convert.ToBase64String(ImageIO.EncodePng(img.contiguous (), Quantization.Round))

    let private figure (width: int) (caption: string) (img: torch.Tensor) =
        let h, w = img.shape.[img.shape.Length - 2], img.shape.[img.shape.Length - 1]
        let pixelated = if int64 width > w then "image-rendering:pixelated;" else ""
        let hh = int (float width * float h / float w)
        sprintf "<figure style='margin:0;display:flex;flex-direction:column;align-items:center'><img src='%s' width='%d' height='%d' style='%s' alt='%s'/><figcaption style='font:11px/1.3 sans-serif;text-align:center;max-width:%dpx;overflow-wrap:anywhere;margin-top:2px'>%s</figcaption></figure>"
            (dataUri img) width hh pixelated (encode caption) width (encode caption)

    /// The grid as an HTML fragment.
    let grid (g: ImageGrid) =
        let cells =
            [ for it in g.Items do
                match asImages it.Image with
                | Some batch ->
                    let n = batch.shape.[0]
                    for i in 0L .. n - 1L do
                        let cap = if n = 1L then it.Caption else sprintf "%s [%d]" it.Caption i
                        yield figure g.Width cap batch.[i]
                | None ->
                    yield sprintf "<figure style='margin:0'><pre style='font-size:11px'>%s: not an image %s</pre></figure>"
                              (encode it.Caption) (encode (sprintf "%A %O" it.Image.shape it.Image.dtype)) ]
        let cols = if g.Columns > 0 then g.Columns else max 1 cells.Length
        sprintf "<div style='display:grid;grid-template-columns:repeat(%d,%dpx);gap:6px;align-items:start'>%s</div>"
            cols g.Width (String.Join("", cells))

    /// A grid of captioned images (one row of at most 6; 192-px cells).
    let row (items: (string * torch.Tensor) list) =
        { Items = items |> List.map (fun (c, t) -> { Caption = c; Image = t })
          Columns = min 6 (max 1 items.Length)
          Width = 192 }

    let private fmtCell (v: obj) =
        match v with
        | null -> "", ""
        | :? float as f -> f.ToString("G6", CultureInfo.InvariantCulture), f.ToString("R", CultureInfo.InvariantCulture)
        | :? float32 as f -> f.ToString("G6", CultureInfo.InvariantCulture), f.ToString("R", CultureInfo.InvariantCulture)
        | :? int | :? int64 | :? decimal as n -> Convert.ToString(n, CultureInfo.InvariantCulture), Convert.ToString(n, CultureInfo.InvariantCulture)
        | :? torch.Tensor as t when t.numel () = 1L ->
            let f = t.to_type(torch.ScalarType.Float64).item<float> ()
            f.ToString("G6", CultureInfo.InvariantCulture), f.ToString("R", CultureInfo.InvariantCulture)
        | :? torch.Tensor as t -> sprintf "tensor %A %O" t.shape t.dtype, ""
        | v ->
            let s = Convert.ToString(v, CultureInfo.InvariantCulture)
            s, s

    /// Column names and cell values of one row object: an F# record or anonymous record, a dictionary, a tuple, or
    /// any object's public readable properties; a plain value is one column "value".
    let columnsOf (row: obj) : (string * obj) list =
        match row with
        | null -> [ "value", null ]
        | _ ->
            let t = row.GetType()
            if FSharpType.IsRecord(t, true) then
                FSharpType.GetRecordFields(t, true) |> Array.map (fun p -> p.Name, p.GetValue row) |> List.ofArray
            elif FSharpType.IsTuple t then
                FSharpValue.GetTupleFields row |> Array.mapi (fun i v -> sprintf "Item%d" (i + 1), v) |> List.ofArray
            elif (row :? IDictionary) then
                [ for e in (row :?> IDictionary) |> Seq.cast<DictionaryEntry> -> string e.Key, e.Value ]
            elif t.IsPrimitive || row :? string || row :? decimal then [ "value", row ]
            else
                t.GetProperties()
                |> Array.filter (fun p -> p.CanRead && p.GetIndexParameters().Length = 0)
                |> Array.map (fun p -> p.Name, (try p.GetValue row with _ -> null))
                |> List.ofArray

    /// Clicking a header sorts by that column (numbers numerically; click again to reverse). Inline, so it works
    /// offline and in exported HTML.
    let private sortScript =
        "var t=this.closest('table'),b=t.tBodies[0],i=this.cellIndex,d=this.dataset.d=this.dataset.d==='a'?'d':'a';"
        + "var r=Array.from(b.rows);r.sort(function(x,y){var p=x.cells[i].dataset.v,q=y.cells[i].dataset.v,"
        + "m=parseFloat(p),n=parseFloat(q);var c=(!isNaN(m)&&!isNaN(n))?m-n:String(p).localeCompare(String(q));return d==='a'?c:-c;});"
        + "r.forEach(function(e){b.appendChild(e);});"

    /// A sortable HTML table of the rows (columns from the first row; later rows fill the same columns by name).
    let table (rows: seq<obj>) =
        let rows = List.ofSeq rows
        let sb = StringBuilder()
        match rows with
        | [] -> "<i>(no rows)</i>"
        | first :: _ ->
            let cols = columnsOf first |> List.map fst
            sb.Append("<table style='border-collapse:collapse;font:12px sans-serif'><thead><tr>") |> ignore
            for c in cols do
                sb.AppendFormat("<th style='border-bottom:1px solid #888;padding:2px 8px;cursor:pointer;text-align:left' title='click to sort' onclick=\"{0}\">{1}</th>", sortScript, encode c) |> ignore
            sb.Append("</tr></thead><tbody>") |> ignore
            for r in rows do
                let m = columnsOf r |> dict
                sb.Append("<tr>") |> ignore
                for c in cols do
                    let shown, sortKey = if m.ContainsKey c then fmtCell m.[c] else "", ""
                    sb.AppendFormat("<td style='padding:2px 8px;border-bottom:1px solid #ddd' data-v='{0}'>{1}</td>", encode sortKey, encode shown) |> ignore
                sb.Append("</tr>") |> ignore
            sb.Append(sprintf "</tbody></table><div style='font:11px sans-serif;color:#666'>%d rows</div>" rows.Length).ToString()

    /// One line for a tensor that is not an image: shape, dtype, device and min / mean / max.
    let tensorSummary (t: torch.Tensor) =
        use _ = torch.no_grad ()
        let stats =
            if t.numel () = 0L then ""
            elif t.is_floating_point () then
                let x = t.detach().to_type(torch.ScalarType.Float64)
                sprintf " min %.4g mean %.4g max %.4g" (x.min().item<float> ()) (x.mean().item<float> ()) (x.max().item<float> ())
            else ""
        sprintf "tensor [%s] %O on %O%s" (String.Join(", ", t.shape)) t.dtype t.device stats
