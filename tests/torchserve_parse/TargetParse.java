// How TorchServe 0.12 reads a request target, with the very classes of its frontend's jar: Netty's
// QueryStringDecoder, then `decoder.path().split("/")` (HttpRequestHandler) for the resource and
// `decoder.parameters()` (NettyUtils.getParameter takes the first value) for the parameters.
// Reads one JSON string (a target) per line on stdin, answers one JSON object per line after "@@".
import com.google.gson.Gson;
import io.netty.handler.codec.http.QueryStringDecoder;
import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

public class TargetParse {
    public static void main(String[] args) throws Exception {
        Gson gson = new Gson();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        String line;
        while ((line = in.readLine()) != null) {
            String target = gson.fromJson(line, String.class);
            Map<String, Object> out = new LinkedHashMap<>();
            try {
                QueryStringDecoder decoder = new QueryStringDecoder(target);
                out.put("segments", decoder.path().split("/"));
                Map<String, List<String>> params = decoder.parameters();
                out.put("params", params);
            } catch (RuntimeException e) {
                out.put("error", e.toString());
            }
            System.out.println("@@" + gson.toJson(out));  // other lines are the jar's warnings
            System.out.flush();
        }
    }
}
