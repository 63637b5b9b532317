-- Example catalogue for the local CDC quickstart and the end-to-end tests.
--
-- Idempotent: CREATE ... IF NOT EXISTS and INSERT ... ON CONFLICT DO NOTHING, so loading it twice
-- is a no-op (and emits no change events). `debezium/run-local.sh --reset` drops the table first
-- for a clean reload.
--
-- Debezium captures `public` (schema.include.list=public) through the pgoutput plugin; the
-- publication is created by Debezium itself (publication.autocreate.mode=filtered), so none is
-- created here. REPLICA IDENTITY stays DEFAULT (primary key): update events carry `before: null`
-- and deletes carry the key columns plus filler values. Uncomment the ALTER below to get full
-- before-images instead.

SET client_min_messages = warning;

CREATE TABLE IF NOT EXISTS public.products (
    id          bigserial PRIMARY KEY,
    sku         text           NOT NULL UNIQUE,
    name        text           NOT NULL,
    description text           NOT NULL,
    category    text           NOT NULL,
    price       numeric(10, 2) NOT NULL CHECK (price >= 0),
    tags        text[]         NOT NULL DEFAULT '{}',
    updated_at  timestamptz    NOT NULL DEFAULT now()
);

-- ALTER TABLE public.products REPLICA IDENTITY FULL;

-- Keep updated_at honest on every UPDATE.
CREATE OR REPLACE FUNCTION public.products_touch_updated_at() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.updated_at := now();
    RETURN NEW;
END;
$$;

DROP TRIGGER IF EXISTS products_touch_updated_at ON public.products;
CREATE TRIGGER products_touch_updated_at
    BEFORE UPDATE ON public.products
    FOR EACH ROW EXECUTE FUNCTION public.products_touch_updated_at();

INSERT INTO public.products (id, sku, name, description, category, price, tags) VALUES
-- Outdoor gear
(1, 'OUT-TENT-2P', 'Ridgeline 2-Person Backpacking Tent',
 'A freestanding three-season tent that weighs just under two kilograms packed. The single aluminium hub pole pitches in about three minutes, two side doors mean nobody climbs over a sleeping partner, and the fully taped rainfly shrugged off an all-night downpour in our testing. Vestibules are big enough for two packs and muddy boots.',
 'outdoor', 329.00, '{camping,tent,backpacking,lightweight,waterproof}'),
(2, 'OUT-BAG-M5', 'Alpine Down Sleeping Bag (-5 °C)',
 'Mummy-shaped sleeping bag filled with 650-fill responsibly sourced duck down, rated comfortable to minus five degrees Celsius. A draft collar and contoured hood keep warm air in on cold mountain nights, and it compresses to the size of a loaf of bread in the included stuff sack.',
 'outdoor', 249.95, '{camping,sleeping bag,down,winter,backpacking}'),
(3, 'OUT-STOVE-TI', 'Titanium Canister Stove',
 'A pocket-sized gas stove that screws onto standard threaded canisters and boils a litre of water in roughly three and a half minutes. Serrated pot supports fold flat, the flame adjusts from a gentle simmer to full boil, and at 56 grams you will forget it is in your pack.',
 'outdoor', 54.00, '{camping,stove,cooking,ultralight,titanium}'),
(4, 'OUT-FILTER-SQ', 'Squeeze Water Filter',
 'Hollow-fibre membrane filter that removes 99.9999% of bacteria and protozoa from streams and lakes. Fill the soft pouch, screw on the filter and squeeze clean water straight into your bottle, or attach it inline to a hydration bladder. Backflush with the included syringe to restore flow.',
 'outdoor', 39.90, '{hiking,water,filter,survival,backpacking}'),
(5, 'OUT-HEADLAMP-400', 'Trailblazer 400-Lumen Headlamp',
 'Rechargeable LED headlamp with a 400-lumen spot beam for night hiking and a soft red mode that preserves night vision around camp. USB-C charging, IPX6 weather sealing and a lock mode so it never switches on inside your pack and drains the battery.',
 'outdoor', 44.99, '{hiking,lighting,headlamp,rechargeable,night}'),
(6, 'OUT-POLES-CF', 'Carbon Fibre Trekking Poles (pair)',
 'Three-section folding trekking poles made from carbon fibre, with cork grips that wick sweat and external lever locks you can adjust with gloves on. They take strain off the knees on long descents and double as tent poles for many trekking-pole shelters.',
 'outdoor', 139.00, '{hiking,trekking poles,carbon,knees,mountains}'),
(7, 'OUT-JACKET-RAIN', 'Stormshell Waterproof Rain Jacket',
 'Three-layer breathable waterproof jacket with fully taped seams, pit zips for venting on steep climbs and a helmet-compatible hood. Packs into its own chest pocket. Built for wet coastal hikes and sudden alpine storms rather than city commutes.',
 'outdoor', 189.00, '{clothing,rain jacket,waterproof,hiking,breathable}'),
(8, 'OUT-HAMMOCK', 'Parachute Nylon Camping Hammock',
 'Roomy single hammock sewn from ripstop parachute nylon, with tree-friendly straps and aluminium carabiners. Sets up between two trees in under a minute and holds up to 180 kg. Add a bug net and tarp and it becomes a complete lightweight shelter.',
 'outdoor', 34.50, '{camping,hammock,relaxing,lightweight,trees}'),
(9, 'OUT-KAYAK-PADDLE', 'Touring Kayak Paddle 230 cm',
 'Low-angle touring paddle with fibreglass blades and a two-piece carbon shaft that breaks down for transport. Adjustable feathering and drip rings keep your lap dry on long days of sea kayaking and lake paddling.',
 'outdoor', 159.00, '{kayaking,paddle,water sports,touring,lake}'),
(10, 'OUT-BINO-842', 'Compact 8x42 Binoculars',
 'Roof-prism binoculars with fully multi-coated lenses for bright, sharp views at dawn and dusk. Nitrogen-purged and fog-proof, with twist-up eyecups for glasses wearers. Ideal for birdwatching, wildlife spotting and following climbers on a far-off ridge.',
 'outdoor', 219.00, '{birdwatching,binoculars,optics,wildlife,nature}'),
-- Kitchen
(11, 'KIT-SKILLET-12', 'Pre-Seasoned Cast Iron Skillet 30 cm',
 'A heavy cast iron frying pan that holds heat for a perfect sear on steaks and crisp edges on cornbread. It arrives seasoned with vegetable oil, moves from stovetop to oven or campfire, and only gets better with every use if you dry and oil it after washing.',
 'kitchen', 39.95, '{cookware,cast iron,skillet,searing,oven-safe}'),
(12, 'KIT-CHEF-KNIFE', 'Damascus Steel Chef''s Knife 20 cm',
 'A razor-sharp 20 cm chef''s knife forged from 67 layers of Damascus steel around a hard VG-10 core. The balanced pakkawood handle makes long prep sessions comfortable, and the blade glides through tomatoes, onions and herbs without bruising them.',
 'kitchen', 119.00, '{knife,cutlery,damascus,chef,prep}'),
(13, 'KIT-ESPRESSO', 'Dual Boiler Espresso Machine',
 'Semi-automatic espresso machine with separate boilers for brewing and steaming, so you can pull a shot and froth milk at the same time. PID temperature control keeps extraction consistent, and the commercial-size 58 mm portafilter makes café-quality lattes at home.',
 'kitchen', 1249.00, '{coffee,espresso,barista,appliance,latte}'),
(14, 'KIT-GRINDER-BURR', 'Conical Burr Coffee Grinder',
 'Stainless steel conical burrs with 40 grind settings, from powder-fine for Turkish coffee to coarse for French press and cold brew. Low-speed grinding keeps beans cool so the aroma survives, and the timer doses the same amount every morning.',
 'kitchen', 149.00, '{coffee,grinder,burr,french press,pour over}'),
(15, 'KIT-DUTCH-OVEN', 'Enamelled Dutch Oven 5.5 L',
 'Enamelled cast iron casserole for slow braises, stews, soups and crusty no-knead bread. The tight-fitting lid bastes food with its own steam, the light interior lets you watch browning, and it goes from hob to oven to table.',
 'kitchen', 289.00, '{cookware,dutch oven,braising,bread,enamel}'),
(16, 'KIT-SOUSVIDE', 'Precision Sous Vide Cooker',
 'Clip-on immersion circulator that holds a water bath within 0.1 °C for perfectly cooked steak, salmon and eggs. Set the temperature from the app, walk away, and finish with a quick sear. Works with any stockpot.',
 'kitchen', 179.00, '{sous vide,appliance,precision cooking,steak,smart home}'),
(17, 'KIT-BOARD-WALNUT', 'End-Grain Walnut Cutting Board',
 'Thick end-grain cutting board made from solid American black walnut. The self-healing surface is gentle on knife edges, juice grooves catch drips when carving a roast, and rubber feet keep it from sliding on the counter.',
 'kitchen', 94.00, '{cutting board,walnut,wood,carving,kitchen prep}'),
(18, 'KIT-KETTLE-GOOSE', 'Gooseneck Pour-Over Kettle',
 'Electric gooseneck kettle with variable temperature control and a hold mode, designed for precise, slow pours over coffee filters. Also great for green tea, which tastes bitter when brewed with boiling water.',
 'kitchen', 89.00, '{coffee,tea,kettle,pour over,temperature control}'),
(19, 'KIT-MIXER-STAND', 'Tilt-Head Stand Mixer 4.8 L',
 'Powerful stand mixer with a planetary mixing action, a stainless steel bowl and attachments for whisking meringues, beating cake batter and kneading bread dough. Ten speeds and a splash guard keep flour on the inside.',
 'kitchen', 449.00, '{baking,mixer,appliance,bread,cakes}'),
(20, 'KIT-FERMENT', 'Fermentation Crock Kit',
 'Stoneware crock with a water-sealed lid and weighting stones for making sauerkraut, kimchi and pickles at home. The airlock lets carbon dioxide escape while keeping oxygen and mould out, with a recipe booklet for beginners.',
 'kitchen', 64.00, '{fermentation,kimchi,sauerkraut,pickles,stoneware}'),
-- Electronics
(21, 'ELE-HEADPHONES-NC', 'Quietwave Noise-Cancelling Headphones',
 'Over-ear wireless headphones with adaptive active noise cancellation that silences aircraft engines and open-plan office chatter. Thirty hours of battery, multipoint Bluetooth pairing with laptop and phone, and plush memory-foam cushions for long flights.',
 'electronics', 299.00, '{audio,headphones,noise cancelling,bluetooth,travel}'),
(22, 'ELE-EREADER', 'Paperlight E-Reader 7"',
 'Glare-free 300 ppi e-ink display that reads like printed paper, even in bright sunlight at the beach. Adjustable warm front light for bedtime reading, weeks of battery life and a waterproof body so a bath or pool is no danger.',
 'electronics', 159.00, '{e-reader,books,reading,e-ink,waterproof}'),
(23, 'ELE-KEYBOARD-MECH', 'Low-Profile Mechanical Keyboard',
 'Wireless mechanical keyboard with hot-swappable tactile switches, a slim aluminium case and per-key backlighting. Connects to three devices and switches between them with one key; a favourite of programmers and writers who type all day.',
 'electronics', 129.00, '{keyboard,mechanical,programming,wireless,productivity}'),
(24, 'ELE-SOLAR-BANK', 'Solar Power Bank 20,000 mAh',
 'Rugged rubberised battery pack with a built-in solar panel and a bright flashlight. Charges two phones at once over USB-C and USB-A; the solar panel trickle-charges it on multi-day hikes and during power cuts.',
 'electronics', 49.99, '{power bank,solar,charging,camping,emergency}'),
(25, 'ELE-SPEAKER-BT', 'Waterproof Bluetooth Speaker',
 'Palm-sized speaker with surprisingly deep bass, IP67 dust and water resistance and a strap that hangs from a tent loop or shower head. It floats, survives drops onto rocks and plays for twelve hours on a charge.',
 'electronics', 79.00, '{audio,speaker,bluetooth,waterproof,portable}'),
(26, 'ELE-MONITOR-4K', '27" 4K USB-C Monitor',
 'Colour-accurate 27-inch IPS monitor with 4K resolution, factory calibration covering 99% of sRGB and a single USB-C cable that carries video, data and 90 W of laptop charging. A height-adjustable stand and built-in KVM tidy up a home office desk.',
 'electronics', 549.00, '{monitor,4k,usb-c,home office,photo editing}'),
(27, 'ELE-DOORBELL', 'Smart Video Doorbell',
 'Wi-Fi video doorbell with a head-to-toe 1536p camera, night vision and two-way talk. It sends a phone notification when a parcel arrives or someone lingers at the door, and recordings stay on a local microSD card instead of a subscription cloud.',
 'electronics', 119.00, '{smart home,security,camera,doorbell,privacy}'),
(28, 'ELE-GPS-WATCH', 'Multisport GPS Watch',
 'Outdoor smartwatch with multi-band GPS, preloaded topographic maps and breadcrumb navigation back to the trailhead. Tracks running, cycling, swimming and ski touring, measures heart rate and blood oxygen at altitude, and lasts two weeks between charges.',
 'electronics', 499.00, '{gps,watch,fitness,navigation,running}'),
(29, 'ELE-RPI-KIT', 'Single-Board Computer Starter Kit',
 'Everything needed to start tinkering: a quad-core single-board computer, official power supply, aluminium heatsink case, 64 GB microSD card with the operating system preinstalled and a breadboard with jumper wires. Great for home automation, retro gaming and learning Python.',
 'electronics', 129.00, '{raspberry pi,maker,electronics kit,programming,education}'),
(30, 'ELE-LABEL-PRINTER', 'Thermal Label Printer',
 'Inkless thermal printer for shipping labels, barcodes and pantry jars. Prints 4x6 inch labels for every major courier from a laptop or phone, never needs ink or toner, and is a time-saver for small online shops.',
 'electronics', 139.00, '{printer,labels,shipping,small business,thermal}'),
-- Books
(31, 'BOOK-DDIA', 'Designing Data-Intensive Applications',
 'An in-depth guide to the architecture of reliable, scalable and maintainable data systems: replication, partitioning, transactions, consensus, batch and stream processing. Essential reading for backend engineers wondering how databases and message queues really work, including change data capture and event logs.',
 'books', 49.99, '{book,software engineering,databases,distributed systems,streaming}'),
(32, 'BOOK-SALT', 'Salt, Fat, Acid, Heat',
 'A cookbook that teaches the four elements of good cooking instead of just recipes. Illustrated with playful watercolours, it explains why a pinch of salt, a splash of vinegar or the right amount of heat transforms a dish, so you can improvise with confidence.',
 'books', 32.00, '{book,cooking,cookbook,food science,kitchen}'),
(33, 'BOOK-WILD', 'Wild: A Journey on the Pacific Crest Trail',
 'A memoir of a woman who, after losing her mother and her marriage, hikes more than a thousand miles of the Pacific Crest Trail alone with no backpacking experience and a far too heavy pack. Raw, funny and moving; it has sent many readers out onto the trail.',
 'books', 17.00, '{book,memoir,hiking,adventure,travel}'),
(34, 'BOOK-DUNE', 'Dune',
 'The classic science-fiction epic of politics, religion and ecology on the desert planet Arrakis, the only source of the most valuable substance in the universe. A young heir must survive betrayal, giant sandworms and his own prophetic visions.',
 'books', 19.99, '{book,science fiction,novel,classic,desert}'),
(35, 'BOOK-FIELD-BIRDS', 'Field Guide to the Birds of Europe',
 'Comprehensive pocket field guide with detailed illustrations of every species, range maps and notes on calls and songs. Organised for quick identification in the field, with tips on telling apart confusing warblers, gulls and birds of prey.',
 'books', 29.50, '{book,birdwatching,field guide,nature,wildlife}'),
(36, 'BOOK-RUST', 'The Rust Programming Language',
 'The official introduction to Rust, covering ownership, borrowing, lifetimes, traits, error handling, concurrency without data races and async programming. Packed with examples that build up to a multithreaded web server; ideal for systems programmers coming from C++, Go or Python.',
 'books', 39.95, '{book,programming,rust,systems programming,software engineering}'),
(37, 'BOOK-BREAD', 'Flour Water Salt Yeast',
 'A baker''s guide to artisan bread and pizza at home, built around long, slow fermentation and a standard Dutch oven. Step-by-step schedules fit around a working day, with recipes for country loaves, levain breads and Neapolitan-style pizza dough.',
 'books', 27.50, '{book,baking,bread,sourdough,pizza}'),
(38, 'BOOK-ATOMIC', 'Atomic Habits',
 'A practical framework for building good habits and breaking bad ones through tiny changes that compound over time. Covers habit stacking, environment design and identity-based goals, with examples from athletes, artists and business leaders.',
 'books', 21.00, '{book,self-help,habits,productivity,psychology}'),
-- Home & garden
(39, 'HOME-LAMP-SUNRISE', 'Sunrise Alarm Clock Lamp',
 'A bedside lamp that gradually brightens over thirty minutes before your alarm, simulating a sunrise so you wake up naturally even on dark winter mornings. Includes nature sounds, an FM radio and a sunset mode that dims slowly to help you fall asleep.',
 'home', 89.00, '{sleep,lamp,alarm clock,wellness,bedroom}'),
(40, 'HOME-PURIFIER', 'HEPA Air Purifier',
 'Quiet air purifier with a true HEPA and activated carbon filter that captures pollen, pet dander, smoke and dust in rooms up to 40 square metres. An air quality sensor adjusts fan speed automatically, and night mode is quieter than a whisper.',
 'home', 199.00, '{air purifier,allergies,hepa,bedroom,health}'),
(41, 'HOME-BLANKET-WOOL', 'Merino Wool Throw Blanket',
 'A soft, breathable throw knitted from fine merino wool that keeps you warm on the sofa without overheating. Naturally odour-resistant and machine washable on a wool cycle; it also makes a cosy layer in a camper van.',
 'home', 129.00, '{blanket,wool,merino,living room,cosy}'),
(42, 'GAR-SEED-KIT', 'Heirloom Vegetable Seed Collection',
 'Twenty packets of open-pollinated heirloom seeds including tomatoes, beans, kale, carrots and squash, selected for beginner gardeners. Save seeds from your harvest and replant them next spring; includes a sowing calendar.',
 'garden', 24.99, '{gardening,seeds,vegetables,heirloom,organic}'),
(43, 'GAR-COMPOSTER', 'Tumbling Compost Bin',
 'Dual-chamber rotating composter that turns kitchen scraps and garden waste into rich compost in a matter of weeks. Turning the drum every few days aerates the pile, and the sealed design keeps out rats and neighbourhood dogs.',
 'garden', 119.00, '{gardening,compost,recycling,soil,sustainability}'),
(44, 'GAR-PRUNER', 'Bypass Pruning Shears',
 'Professional-grade bypass secateurs with hardened steel blades that make clean cuts on roses, fruit trees and shrubs up to 2 cm thick. The rotating handle reduces hand fatigue during long pruning sessions in autumn.',
 'garden', 42.00, '{gardening,pruning,tools,roses,fruit trees}'),
-- Sports & fitness
(45, 'SPT-YOGA-MAT', 'Natural Rubber Yoga Mat',
 'Grippy 4.5 mm yoga mat made from natural tree rubber with a polyurethane top layer that stays non-slip even during sweaty hot yoga. Laser-etched alignment lines help with posture, and it rolls up tight for the commute to the studio.',
 'sports', 98.00, '{yoga,fitness,mat,eco-friendly,exercise}'),
(46, 'SPT-KETTLEBELL', 'Adjustable Kettlebell 4-18 kg',
 'One compact kettlebell that replaces six: twist the handle to select a weight from 4 to 18 kilograms. Ideal for swings, goblet squats and Turkish get-ups in a small apartment with no space for a rack of weights.',
 'sports', 159.00, '{fitness,kettlebell,strength training,home gym,weights}'),
(47, 'SPT-BIKE-LIGHTS', 'USB Rechargeable Bike Light Set',
 'Bright front and rear bicycle lights that clip on without tools and charge over USB-C. Daytime flash modes make you visible to drivers, and the rear light brightens automatically when it senses you braking.',
 'sports', 36.00, '{cycling,bike,lights,safety,commuting}'),
(48, 'SPT-CLIMB-SHOES', 'All-Round Rock Climbing Shoes',
 'Moderately downturned climbing shoes with sticky rubber and a comfortable velcro closure, built for long gym sessions and outdoor sport routes alike. Precise enough for small edges, comfortable enough to wear for a whole multi-pitch day.',
 'sports', 119.00, '{climbing,shoes,bouldering,outdoor,sport}')
ON CONFLICT (id) DO NOTHING;

-- Explicit ids above: move the sequence past them so plain INSERTs get fresh ids.
DO $$
BEGIN
    PERFORM setval(pg_get_serial_sequence('public.products', 'id'),
                   GREATEST((SELECT max(id) FROM public.products), 1));
END;
$$;
